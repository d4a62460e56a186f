#!/bin/bash
# Smoke test of the built guest (guest/out, see build.sh) under QEMU TCG:
#   raw   disk.raw, virtio-net: readiness, HTTP, guest agent, ACPI power button
#   qcow2 disk.qcow2, e1000 (QEMU's default NIC): readiness, HTTP, power button
#   iso   guest.iso: readiness, power button
#   ignore-acpi  fw_cfg mode: power button is ignored, QEMU keeps running
#   kernel-pvh   -kernel vmlinux (PVH) + vmdriver.mode=poweroff: guest powers off
#   q35-kernel   -machine q35, -kernel vmlinux, e1000e: readiness, HTTP, power button
#   panic        fw_cfg mode + -device pvpanic: QMP GUEST_PANICKED
# Usage: guest/smoke.sh [OUTDIR]   (default: guest/out)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
[ -f "$out/manifest.json" ] || { echo "smoke.sh: no build in $out (run guest/build.sh)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "smoke.sh: qemu-system-x86_64 missing" >&2; exit 2; }
exec python3 - "$out" <<'PYEOF'
import json, os, socket, subprocess, sys, tempfile, threading, time, urllib.request

OUT = sys.argv[1]
READY = "VMDRIVER-GUEST-READY"
results = []
timings = {}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class QMP:
    def __init__(self, path, timeout=10):
        end = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > end:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        self.events = []
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self.read()
            if "event" in r:
                self.events.append(r)
            elif "return" in r or "error" in r:
                return r

    def wait_event(self, name, timeout):
        end = time.time() + timeout
        while not any(e["event"] == name for e in self.events):
            left = end - time.time()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                r = self.read()
            except (socket.timeout, EOFError, OSError):
                return any(e["event"] == name for e in self.events)
            if "event" in r:
                self.events.append(r)
        return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class VM:
    def __init__(self, name, drive, nic_model=None, extra=(), mode=None, machine="pc"):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="vmdriver-smoke-")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.qga_path = os.path.join(self.dir, "qga.sock")
        self.http_port = free_port()
        nic = "user,hostfwd=tcp:127.0.0.1:%d-:8080" % self.http_port
        if nic_model:
            nic += ",model=" + nic_model
        argv = ["qemu-system-x86_64", "-machine", machine + ",accel=tcg", "-m", "256",
                "-nographic", "-nodefaults", "-serial", "stdio",
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
                "-nic", nic,
                "-device", "virtio-serial",
                "-chardev", "socket,id=qga,path=%s,server=on,wait=off" % self.qga_path,
                "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0"]
        argv += drive
        if mode:
            argv += ["-fw_cfg", "name=opt/vmdriver/mode,string=" + mode]
        argv += list(extra)
        self.lines = []
        self.eof = False
        self.cond = threading.Condition()
        self.t0 = time.time()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        threading.Thread(target=self._reader, daemon=True).start()
        self.qmp = QMP(self.qmp_path)

    def _reader(self):
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").replace("\r", "")
                with self.cond:
                    self.lines.append((time.time() - self.t0, text))
                    self.cond.notify_all()
        with self.cond:
            self.lines.append((time.time() - self.t0, buf.decode(errors="replace")))
            self.eof = True
            self.cond.notify_all()

    def wait_line(self, needle, timeout):
        end = time.time() + timeout
        with self.cond:
            while True:
                for t, text in self.lines:
                    if needle in text:
                        return t, text
                left = end - time.time()
                if left <= 0 or self.eof:
                    return None, None
                self.cond.wait(min(left, 0.2))

    def count(self, needle):
        with self.cond:
            return sum(1 for _, text in self.lines if needle in text)

    def http(self, path):
        url = "http://127.0.0.1:%d%s" % (self.http_port, path)
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode(errors="replace")

    def qga(self, cmd, timeout=10):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(self.qga_path)
        f = s.makefile("rwb")
        f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": 4711}}).encode() + b"\n")
        f.flush()
        while json.loads(f.readline()).get("return") != 4711:
            pass
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        r = json.loads(f.readline())
        s.close()
        return r

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.qmp.close()

    def dump(self):
        with self.cond:
            return "\n".join("    %6.2f %s" % (t, x) for t, x in self.lines[-40:])


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print("%s %s%s" % ("ok  " if ok else "FAIL", name, (": " + detail) if detail else ""), flush=True)
    return ok


def boot(vm, label):
    t, line = vm.wait_line(READY + " ", 60)
    if not check("%s: readiness line" % label, t is not None,
                 ("%.2fs  %s" % (t, line)) if t is not None else "not seen\n" + vm.dump()):
        return False
    timings[label] = t
    check("%s: readiness line starts the line" % label, line.startswith(READY + " "), repr(line))
    time.sleep(0.3)
    check("%s: exactly one readiness line" % label, vm.count(READY) == 1)
    return True


def powerdown(vm, label):
    vm.qmp.cmd("system_powerdown")
    try:
        vm.proc.wait(30)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
    check("%s: QEMU exits within 30s after system_powerdown" % label, exited, "" if exited else vm.dump())
    check("%s: power-off message" % label,
          vm.wait_line("vmdriver-guest: power button, powering off", 1)[0] is not None)


def run(label, fn, *args, **kw):
    vm = None
    try:
        vm = VM(label, *args, **kw)
        fn(vm, label)
    except Exception as e:  # a broken scenario must not hide the others
        check("%s: no exception" % label, False, "%s: %s\n%s" % (type(e).__name__, e, vm.dump() if vm else ""))
    finally:
        if vm:
            vm.stop()


def scenario_raw(vm, label):
    if not boot(vm, label):
        return
    body = vm.http("/")
    check("%s: HTTP / contains vmdriver-test-guest" % label,
          "vmdriver-test-guest" in body.splitlines(), repr(body[:200]))
    check("%s: HTTP /hostname" % label, vm.http("/hostname").strip() == "vmdriver-guest")
    r = vm.qga("guest-ping")
    check("%s: guest agent guest-ping" % label, r == {"return": {}}, repr(r))
    powerdown(vm, label)


def scenario_disk(vm, label):
    if not boot(vm, label):
        return
    check("%s: HTTP / contains vmdriver-test-guest" % label, "vmdriver-test-guest" in vm.http("/"))
    powerdown(vm, label)


def scenario_ignore(vm, label):
    if not boot(vm, label):
        return
    vm.qmp.cmd("system_powerdown")
    t, _ = vm.wait_line("vmdriver-guest: ignoring power button", 10)
    check("%s: guest logs ignoring power button" % label, t is not None, vm.dump() if t is None else "")
    time.sleep(max(0, 10 - (time.time() - vm.t0 - (t or 0))))
    check("%s: still running 10s after system_powerdown" % label, vm.proc.poll() is None)
    check("%s: guest still serves HTTP" % label, "vmdriver-test-guest" in vm.http("/"))


def scenario_panic(vm, label):
    if not boot(vm, label):
        return
    ok = vm.qmp.wait_event("GUEST_PANICKED", 30)
    check("%s: QMP GUEST_PANICKED event" % label, ok,
          "" if ok else "events: %s\n%s" % ([e["event"] for e in vm.qmp.events], vm.dump()))
    check("%s: kernel panic on the console" % label, vm.wait_line("Kernel panic", 5)[0] is not None)


def scenario_selfpoweroff(vm, label):
    if not boot(vm, label):
        return
    try:
        vm.proc.wait(30)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
    check("%s: guest powers off by itself (mode from kernel command line)" % label, exited)


raw = ["-drive", "file=%s/disk.raw,format=raw,snapshot=on" % OUT]
qcow2 = ["-drive", "file=%s/disk.qcow2,format=qcow2,snapshot=on" % OUT]
iso = ["-cdrom", "%s/guest.iso" % OUT]

run("raw", scenario_raw, raw, nic_model="virtio-net-pci")
run("qcow2", scenario_disk, qcow2)  # default NIC model of -machine pc: e1000
run("iso", scenario_disk, iso, nic_model="virtio-net-pci")
run("ignore-acpi", scenario_ignore, raw, nic_model="virtio-net-pci", mode="ignore-acpi")
cmdline = open(os.path.join(OUT, "cmdline")).read().strip()
direct = ["-kernel", "%s/vmlinux" % OUT, "-initrd", "%s/initrd.img" % OUT,
          "-append", cmdline + " vmdriver.mode=poweroff"]
run("kernel-pvh", scenario_selfpoweroff, direct, nic_model="virtio-net-pci")
# q35: default NIC e1000e, ACPI power button through ICH9
run("q35-kernel", scenario_disk, direct[:-1] + [cmdline], machine="q35")
run("panic", scenario_panic, raw, nic_model="virtio-net-pci", mode="panic", extra=["-device", "pvpanic"])

print("seconds from QEMU start to the readiness line (TCG): " +
      ", ".join("%s %.2f" % kv for kv in timings.items()))
failed = sum(1 for _, ok in results if not ok)
print("%d passed, %d failed" % (len(results) - failed, failed))
sys.exit(1 if failed else 0)
PYEOF
