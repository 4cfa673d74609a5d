"""Child side of :mod:`skilllens.sandbox`: locks the process down, then runs ``solution.py``.

This file is not imported by skilllens: the parent passes its source to ``python -I -B -c`` with
one JSON argument, so it must stay standard-library only. Order (all before any user code):

1. resource limits, soft = hard;
2. all capabilities dropped (matters when the parent runs as root) and ``no_new_privs`` set;
3. Landlock (syscalls 444-446): read-only access to the Python installation and system
   libraries, read-write access only to the run's folder, no TCP bind/connect, and (ABI >= 6) no
   signals or abstract Unix sockets outside the sandbox;
4. a seccomp-BPF filter built with the system's ``libseccomp.so.2`` (default allow, a deny list:
   process creation other than threads, exec, sockets, ptrace, signals to other processes,
   raising limits, mounts/namespaces, kernel-level and metadata calls; foreign syscall ABIs kill
   the process);
5. a Python audit hook (:pep:`578`): a third, in-process layer that Python code can defeat.

Why plain ctypes rather than the PyPI bindings: ``pyseccomp`` (last release 2021) calls
``ctypes.util.find_library`` at import, which starts ``ldconfig``/``gcc`` subprocesses in every
sandboxed run; ``landlock`` is a pre-release whose ruleset lacks the network and scope fields
(ABI 4 and 6) used here. Both would be thin ctypes wrappers over the same calls made below.

Layers that could not be applied are reported to the parent through the status pipe; with
``strict`` the child exits (status 3) before running user code.

Completion marker: the parent passes a random nonce through a pipe (``key_fd``) that is read
and closed before user code runs; after ``solution.py`` returned normally the nonce is written
to ``done_fd``. The parent counts a run as passed only with that nonce and exit status 0, so an
early ``sys.exit(0)``/``exit()``/``raise SystemExit``/``os._exit(0)``, a signal to itself or
closed outputs before the checks never read as passed. Not covered (the program shares this
interpreter): code that deliberately searches the interpreter's memory (frames, ``gc``,
``ctypes``) for the nonce or the harness, or rewrites the checks while they run (``sys.settrace``).
"""
import ctypes
import errno
import json
import os
import sys

CONFIG = json.loads(sys.argv[1])
STATUS = {"layers": [], "missing": {}}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _raw(nr, *args):
    """Plain syscall; returns the result or raises OSError with the errno."""
    res = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a
                                             for a in args])
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def set_limits(limits):
    import resource
    for name, value in limits:
        resource.setrlimit(getattr(resource, name), (value, value))
    STATUS["layers"].append("rlimits")


def drop_privileges():
    """no_new_privs, and an empty capability set when running as root."""
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if os.geteuid() == 0:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
        data = (ctypes.c_uint32 * 6)()  # effective/permitted/inheritable x 2, all zero
        _raw(126, header, data)  # capset
        STATUS["layers"].append("nocaps")


# --- Landlock ------------------------------------------------------------------------------
LL_EXEC, LL_WRITE, LL_READ, LL_READDIR = 1, 2, 4, 8
LL_TRUNCATE, LL_IOCTL_DEV = 1 << 14, 1 << 15
LL_MAKE_CHAR, LL_MAKE_BLOCK, LL_REFER = 1 << 6, 1 << 11, 1 << 13


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    try:
        return _raw(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    except OSError:
        return 0


def apply_landlock(read_paths, write_path):
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.ENOSYS, "Landlock is not enabled in this kernel")
    fs = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    fs |= (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0)
    fs |= LL_IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # TCP bind+connect;
    size = 8 if abi < 4 else (16 if abi < 6 else 24)  # scopes: abstract sockets + signals
    ruleset = _raw(444, ctypes.byref(attr), size, 0)
    file_rights = LL_EXEC | LL_WRITE | LL_READ | LL_TRUNCATE | LL_IOCTL_DEV
    try:
        def allow(path, rights):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return  # a path this machine lacks
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                _raw(445, ruleset, 1, ctypes.byref(_PathBeneath(rights & fs, fd)), 0)
            finally:
                os.close(fd)
        for p in read_paths:
            allow(p, LL_READ | LL_READDIR)
        for dev in ("/dev/null", "/dev/zero"):
            allow(dev, LL_READ | LL_WRITE | LL_IOCTL_DEV)
        allow(write_path, fs & ~(LL_EXEC | LL_MAKE_CHAR | LL_MAKE_BLOCK | LL_IOCTL_DEV))
        _raw(446, ruleset, 0)  # landlock_restrict_self
    finally:
        os.close(ruleset)
    STATUS["layers"].append("landlock")
    STATUS["landlock_abi"] = abi


# --- seccomp -------------------------------------------------------------------------------
ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000
NE, EQ, MASKED_EQ = 1, 4, 7
CLONE_THREAD = 0x00010000
EPERM_ALWAYS = (
    "fork vfork execve execveat ptrace process_vm_readv process_vm_writev kcmp "
    "socket connect bind listen accept accept4 "
    "io_uring_setup io_uring_enter io_uring_register setrlimit "
    "unshare setns mount umount2 pivot_root chroot move_mount open_tree fsopen fsmount fsconfig "
    "fspick mount_setattr open_tree_attr bpf perf_event_open userfaultfd kexec_load "
    "kexec_file_load init_module finit_module delete_module reboot swapon swapoff acct quotactl "
    "quotactl_fd sethostname setdomainname settimeofday clock_settime clock_adjtime adjtimex "
    "iopl ioperm keyctl add_key request_key open_by_handle_at name_to_handle_at pidfd_open "
    "pidfd_getfd pidfd_send_signal process_madvise mknod mknodat chmod fchmod fchmodat fchmodat2 "
    "chown fchown lchown fchownat setxattr lsetxattr fsetxattr removexattr lremovexattr "
    "fremovexattr setxattrat removexattrat file_setattr tkill syslog vhangup personality "
    "lookup_dcookie uselib migrate_pages move_pages").split()
# numbers for calls newer than the system's libseccomp knows (x86_64)
X86_64_NEW = {"setxattrat": 463, "removexattrat": 466, "file_setattr": 469,
              "open_tree_attr": 467}
FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR = 0x40086602, 0x401C5820


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def apply_seccomp():
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    x86_64 = os.uname().machine == "x86_64"
    pid = os.getpid()

    def rule(action, name, *cmps):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            if not (x86_64 and name in X86_64_NEW):
                return  # not a syscall on this architecture
            nr = X86_64_NEW[name]
        arr = (_ArgCmp * len(cmps))(*[_ArgCmp(*c) for c in cmps])
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    try:
        if lib.seccomp_attr_set(ctx, 2, KILL_PROCESS) < 0:  # SCMP_FLTATR_ACT_BADARCH
            raise OSError(errno.EINVAL, "seccomp_attr_set(ACT_BADARCH)")
        eperm, enosys = 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS
        for name in EPERM_ALWAYS:
            rule(eperm, name)
        rule(enosys, "clone3")  # flags sit in memory the filter cannot read; libc falls back
        rule(eperm, "clone", (0, MASKED_EQ, CLONE_THREAD, 0))  # processes, not threads
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            rule(eperm, name, (0, NE, pid, 0))  # signals to this process only
        rule(eperm, "prlimit64", (2, NE, 0, 0))  # reading limits is fine, setting is not
        for req in (FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR):  # chattr on files outside
            rule(eperm, "ioctl", (1, EQ, req, 0))
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    STATUS["layers"].append("seccomp")


# --- audit hook (third layer) --------------------------------------------------------------
def install_audit_hook():
    blocked = ("socket.", "subprocess.", "os.fork", "os.exec", "os.spawn", "os.posix_spawn",
               "os.system", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg",
               "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "sys.remote_exec",
               "webbrowser.")

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(hook)
    STATUS["layers"].append("audit-hook")


def python_paths():
    """This interpreter's installation and import path (``-I``: no user site, no cwd)."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)]
    return paths + [p for p in sys.path if p and os.path.isabs(p)]


def run_to_end(nonce, done_fd):
    """Run ``solution.py`` as ``__main__``; only if it returns (every line, checks included, ran:
    no exception, ``SystemExit``, ``os._exit`` or signal) write ``nonce`` to ``done_fd``.

    ``os.write`` is bound before the program runs, so replacing ``os.write``, ``print`` or
    ``sys.stdout`` does not reach it; the nonce came through a pipe read and closed before the
    program started and appears in no file, argument or environment variable."""
    write = os.write
    import runpy
    runpy.run_path("solution.py", run_name="__main__")
    write(done_fd, nonce)


def main():
    cfg = CONFIG
    nonce = os.read(cfg["key_fd"], 256)  # before any user code; then the pipe is gone
    os.close(cfg["key_fd"])
    steps = [("rlimits", lambda: set_limits(cfg["limits"])), ("nocaps", drop_privileges),
             ("landlock", lambda: apply_landlock(cfg["read"] + python_paths(), cfg["work"])),
             ("seccomp", apply_seccomp)]
    for name, step in steps:
        if name in cfg["skip"]:
            STATUS["missing"][name] = "turned off by the caller"
            continue
        try:
            step()
        except (OSError, AttributeError, ValueError) as e:
            STATUS["missing"][name] = f"{type(e).__name__}: {e}"
    install_audit_hook()
    refused = cfg["strict"] and any(k in STATUS["missing"] for k in ("landlock", "seccomp"))
    STATUS["refused"] = refused
    os.write(cfg["status_fd"], json.dumps(STATUS).encode())
    os.close(cfg["status_fd"])
    if refused:
        os._exit(3)
    sys.argv[:] = ["solution.py"]
    run_to_end(nonce, cfg["done_fd"])


main()
