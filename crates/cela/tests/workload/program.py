# The Python program of the Debian workload test: threads, processes, a TCP round trip over
# loopback, shared memory and hashing, under the container's default seccomp profile.
import hashlib, multiprocessing, socket, subprocess, threading

def square(x):
    return x * x

results = []
threads = [threading.Thread(target=lambda i=i: results.append(i * i)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert sorted(results) == [i * i for i in range(8)]

with multiprocessing.Pool(2) as pool:
    assert pool.map(square, range(10)) == [i * i for i in range(10)]

out = subprocess.run(["sh", "-c", "echo sub"], capture_output=True, text=True, check=True)
assert out.stdout == "sub\n"

srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()
cli.sendall(b"ping"); assert conn.recv(4) == b"ping"

value = multiprocessing.Value("i", 0)
def bump(v):
    with v.get_lock(): v.value += 1
ps = [multiprocessing.Process(target=bump, args=(value,)) for _ in range(4)]
for p in ps: p.start()
for p in ps: p.join()
assert value.value == 4

print("python=ok", hashlib.sha256(b"cela").hexdigest()[:8])
