/* The seccomp probe of the Debian workload test (crates/cela/tests/image_build.rs): tries
 * system calls a container's default profile must refuse, with arguments that make the kernel
 * itself succeed or fail otherwise than EPERM when no filter stands in the way, and prints
 * `name=errno` (0 on success); then an ordinary workload (threads, fork, exec, memory) that must
 * work. Built inside the container with gcc -static. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/keyctl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static void report(const char *name, long r) {
    printf("%s=%d\n", name, r < 0 ? errno : 0);
}

static void *worker(void *arg) {
    long *n = arg;
    for (int i = 0; i < 1000000; i++) (*n)++;
    return NULL;
}

int main(void) {
    report("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
    report("unshare_mount", syscall(SYS_unshare, CLONE_NEWNS));
    report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1));
    report("add_key", syscall(SYS_add_key, "user", "cela-probe", "x", 1, KEY_SPEC_PROCESS_KEYRING));
    report("userfaultfd", syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    report("bpf", syscall(SYS_bpf, 0, NULL, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    report("clone3", syscall(SYS_clone3, NULL, 0));
    report("socket_vsock", syscall(SYS_socket, AF_VSOCK, SOCK_STREAM, 0));
    report("personality_exec", syscall(SYS_personality, READ_IMPLIES_EXEC));
    report("setns", syscall(SYS_setns, -1, 0));
    report("mount", syscall(SYS_mount, "none", "/mnt", "tmpfs", 0, NULL));
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, -1, NULL, 0));
    report("fsopen", syscall(SYS_fsopen, "tmpfs", 0));
    /* The ordinary workload. */
    pthread_t t[4];
    long counts[4] = {0};
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, &counts[i]);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("threads=%s\n", counts[0] + counts[1] + counts[2] + counts[3] == 4000000 ? "ok" : "bad");
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    printf("fork_exec=%s\n", WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "ok" : "bad");
    char *m = mmap(NULL, 1 << 24, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 1, 1 << 24);
    printf("mmap=%s\n", m != MAP_FAILED && m[12345] == 1 ? "ok" : "bad");
    report("personality_query", syscall(SYS_personality, 0xffffffff));
    report("socket_inet", syscall(SYS_socket, AF_INET, SOCK_STREAM, 0));
    return 0;
}
