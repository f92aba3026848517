"""Run by tests/test_api.py in a subprocess (the cache reads its environment once): one
process's view of the CPU op's output cache (csrc/cpu/output_cache.h). Writes the tensors
and observations to the file named by argv[1]."""
import os
import sys
import threading

import torch

import msfused
from blockutil import make_block

MIB = 1 << 20


def idle() -> int:
    return int(torch.ops.msfused._cpu_cache_idle_bytes())


def main(path: str) -> None:
    obs = {}
    torch.manual_seed(0)
    m = make_block(3, 32, merge="concat", backend="cpp", dtype=torch.float32)
    x = torch.randn(8, 3, 128, 130)
    with torch.no_grad():
        y = m(x)
    assert y.nbytes >= 32 * MIB
    first, ptr = y.clone(), y.data_ptr()
    obs["idle_while_used"] = idle()
    del y
    obs["idle_after_free"] = idle()
    with torch.no_grad():
        y = m(x)
    obs["reused"] = y.data_ptr() == ptr
    obs["idle_after_reuse"] = idle()
    obs["same_after_reuse"] = torch.equal(y, first)
    # Copy-on-write clones work (they need a "simple" data pointer, one whose context is the
    # data itself; with another they raised): the clone reads y's values, and a write to it
    # leaves y alone.
    lazy = torch._lazy_clone(y)
    obs["lazy_clone_shares"] = torch.equal(lazy, first)
    lazy.add_(1)
    obs["lazy_clone_copies_on_write"] = torch.equal(y, first) and torch.equal(lazy, first + 1)
    del lazy

    # A forked child (a DataLoader worker) inherits the cache and can use it: the lock is
    # held across the fork and released on both sides. One thread in the child, as
    # DataLoader's workers run.
    del y
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            with torch.no_grad():
                yc = m(x)
            same = torch.equal(yc, first)
            del yc
            # 0: right values and the block idle again; 5: right values, nothing idle
            os._exit(3 if not same else 0 if idle() >= first.nbytes else 5)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    obs["fork_child"] = os.waitstatus_to_exitcode(status)
    with torch.no_grad():
        y = m(x)

    # The storage stays an ordinary resizable one: growing it moves the data to a larger
    # block (the old one goes idle), shrinking keeps it.
    n = y.numel()
    flat = y.view(-1)
    flat.resize_(n + 4 * MIB)
    obs["grown_keeps_values"] = torch.equal(flat[:n], first.view(-1))
    flat.resize_(10)
    obs["shrunk_keeps_values"] = torch.equal(flat, first.view(-1)[:10])
    del flat, y

    # A block freed on another thread (autograd's, a data loader's) comes back the same way.
    with torch.no_grad():
        held = [m(x)]
    t = threading.Thread(target=held.clear)
    t.start()
    t.join()
    obs["idle_after_thread_free"] = idle()

    # torch.profiler's memory profile counts the output, as it counts the CPU allocator's.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        with torch.no_grad():
            y = m(x)
        del y
    obs["profiled_bytes"] = max(e.cpu_memory_usage for e in prof.key_averages()
                                if e.key == "msfused::block_forward")

    # Training: y and the pre-activation (silu saves it) and dx of 32 MiB and more.
    torch.manual_seed(1)
    mt = make_block(64, 32, merge="concat", activation="silu", backend="cpp", dtype=torch.float32)
    xt = torch.randn(8, 64, 128, 130, requires_grad=True)
    grads = {}
    for _ in range(2):  # the second step runs on blocks the first gave back
        xt.grad = None
        mt.zero_grad(set_to_none=True)
        yt = mt(xt)
        yt.backward(torch.ones_like(yt))
        grads = {"y": yt.detach().clone(), "x": xt.grad.clone()}
        grads.update({k: p.grad.clone() for k, p in mt.named_parameters()})
        del yt
    obs["idle_after_training"] = idle()
    obs["released"] = msfused.empty_cpu_cache()
    obs["idle_after_release"] = idle()
    torch.save({"obs": obs, "first": first, "x": x, "state": m.state_dict(), "xt": xt.detach(),
                "state_t": mt.state_dict(), "grads": grads}, path)


if __name__ == "__main__":
    main(sys.argv[1])
