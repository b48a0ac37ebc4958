"""Docker's Python SDK (docker-py, Debian's python3-docker) against `cela serve`: its own code
paths for run (attached and detached), logs, exec, wait, kill, list, inspect, remove and
images. Prints one line per check; any failure raises. usage: docker_sdk.py SOCKET IMAGE"""
import sys

import docker

sock, image = sys.argv[1], sys.argv[2]
client = docker.DockerClient(base_url=f"unix://{sock}", version="auto")
print("version", client.version()["ApiVersion"])

# Attached run: output, and a failure raises ContainerError with the status.
out = client.containers.run(image, ["sh", "-c", "echo from-sdk"], remove=True)
assert out == b"from-sdk\n", out
try:
    client.containers.run(image, ["sh", "-c", "exit 3"], remove=True)
    raise AssertionError("exit 3 did not raise")
except docker.errors.ContainerError as e:
    assert e.exit_status == 3, e.exit_status
print("run ok")

# Detached: listed with its labels, logs apart, exec with its status, kill, wait, remove.
c = client.containers.run(image, ["sh", "-c", "echo out; echo err >&2; exec sleep 60"],
                          detach=True, name="sdk-one", labels={"via": "sdk"})
listed = client.containers.list(filters={"label": "via=sdk"})
assert [x.name for x in listed] == ["sdk-one"], listed
import time
for _ in range(200):
    if c.logs(stdout=True, stderr=False) == b"out\n":
        break
    time.sleep(0.05)
assert c.logs(stdout=True, stderr=False) == b"out\n", c.logs()
assert c.logs(stdout=False, stderr=True) == b"err\n", c.logs(stdout=False, stderr=True)
code, output = c.exec_run(["sh", "-c", "echo exec-out; exit 4"])
assert (code, output) == (4, b"exec-out\n"), (code, output)
c.reload()
assert c.status == "running", c.status
c.kill()
assert c.wait()["StatusCode"] == 137
c.remove()
assert client.containers.list(all=True) == []
print("lifecycle ok")

assert any(image in t for i in client.images.list() for t in i.tags), client.images.list()
try:
    client.containers.get("no-such-container")
    raise AssertionError("a missing container was found")
except docker.errors.NotFound:
    pass
print("images and errors ok")
