"""Interpreter exit while an async_cleanup thread is still in PERFORM: no hang, nothing lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import threading, pvfast
    from pvfast import PvCmd, vmm
    G = 1 << 30
    host = pvfast.Host(walk_threads=1)
    vm = host.create_vm(6 * G, vcpus=2)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * G, 1 * G)
    vm.perform_started.clear()
    t = vmm.unprotect(vm)
    assert t is not None and t.daemon
    vm.perform_started.wait()
    print("exiting", flush=True)
    # main thread ends here while PERFORM is still walking
    """
)

CHECK = textwrap.dedent(
    """
    import atexit, pvfast, threading
    from pvfast import PvCmd, vmm
    G = 1 << 30
    host = pvfast.Host(walk_threads=1)
    vm = host.create_vm(6 * G, vcpus=2)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * G, 1 * G)
    proc = vm.process

    def after():  # runs after pvfast's own hook (atexit is last-in, first-out; pvfast registered first)
        print("alive", proc.alive, "secure", host.uv.secure_pages(), "configs", len(host.uv.config_handles()),
              "leaked", len(host.leaked()), flush=True)

    vm.perform_started.clear()
    t = vmm.unprotect(vm)
    vm.perform_started.wait()
    import pvfast.host as m
    atexit.unregister(m._shutdown_all)
    atexit.register(after)
    atexit.register(m._shutdown_all)
    """
)


def test_interpreter_exit_during_perform_does_not_hang():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "exiting" in out.stdout
    assert time.perf_counter() - start < 60


def test_interpreter_exit_during_perform_cleans_everything():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "alive False secure 0 configs 0 leaked 0" in out.stdout, out.stdout + out.stderr
