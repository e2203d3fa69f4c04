"""Run a script's main(argv) inside the test process, as `python script.py argv` from the repository root
would: stdout and stderr captured, SystemExit("message") turned into exit status 1 with the message on
stderr. A traceback is not an exit status here: the exception reaches the test and fails it. This saves
the ~10 s every fresh interpreter spends importing torch, diffusers, transformers and timm; tests that
need a real process (kill -9, SIGTERM, torchrun, another environment) still start one."""
import contextlib
import io
import os
import signal
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(script, argv, ok=True):
    main = __import__(script.removesuffix(".py")).main  # train.py, sample.py, prepare.py, bench.py
    out, err, code = io.StringIO(), io.StringIO(), 0
    threads, sigterm = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the subprocess tests
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in argv])
            except SystemExit as e:
                if isinstance(e.code, str):
                    err.write(e.code + "\n")
                code = 1 if isinstance(e.code, str) else (e.code or 0)
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    p = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    assert (code == 0) == ok, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def two_gloo_ranks(worker, out_dir):
    """Run worker(rank, 2, port, out_dir) in 2 processes joined by a gloo group on a free local port; the
    workers save rank{0,1}.pt in out_dir, returned loaded."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(out_dir)), nprocs=2, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt")) for r in range(2)]
