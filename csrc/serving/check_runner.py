"""End-to-end check of serving without Python (run by ctest, see CMakeLists.txt):

1. train a small DIEN for a few steps with ``python -m interest_kernels.train --checkpoint``;
2. export it with ``python -m interest_kernels.export`` (both entry points);
3. score one batch with the C++ runner ``ik_serve`` for each entry point (the project's
   operator library loaded with ``--ops``) and compare with the eager Python scores
   (absolute difference at most 1e-5); without ``--ops`` the runner must fail, naming
   the GRU scan operator that DIEN's package calls.

    python csrc/serving/check_runner.py --runner build/cmake/ik_serve --ops build/cmake/libinterest_kernels_ops.so
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from interest_kernels.data import Batch
from interest_kernels.export import (
    CANDIDATE_INPUTS,
    SCORE_INPUTS,
    CandidateScoringModule,
    ScoringModule,
    load_checkpoint_model,
    read_tensors,
    write_tensors,
)


def _inputs(model, rows: int, candidates: int, steps: int):
    gen = torch.Generator().manual_seed(3)

    def ids(table, shape):
        return torch.randint(0, table.weight.shape[0], shape, generator=gen)

    lengths = torch.randint(0, steps + 1, (rows,), generator=gen)
    lengths[0] = 0
    valid = torch.arange(steps) < lengths[:, None]
    users = Batch(
        user=ids(model.user_embedding, (rows,)), item=ids(model.item_embedding, (rows,)),
        cat=ids(model.cat_embedding, (rows,)), hist_items=ids(model.item_embedding, (rows, steps)) * valid,
        hist_cats=ids(model.cat_embedding, (rows, steps)) * valid, lengths=lengths,
        context=torch.stack([ids(t, (rows,)) for t in model.context_embeddings], 1)
        if len(model.context_embeddings) else torch.zeros(rows, 0, dtype=torch.int64), label=None,
    )
    score = dict(zip(SCORE_INPUTS, (users.user, users.item, users.cat, users.hist_items, users.hist_cats,
                                    users.lengths, users.context)))
    cand = dict(zip(CANDIDATE_INPUTS, (users.user, users.hist_items, users.hist_cats, users.lengths, users.context,
                                       ids(model.item_embedding, (candidates,)),
                                       ids(model.cat_embedding, (candidates,)),
                                       torch.randint(0, rows, (candidates,), generator=gen))))
    return score, cand


def _run(cmd, what):
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[:3000]}")
    print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runner", required=True)
    p.add_argument("--ops", required=True, help="the operator library the runner loads")
    p.add_argument("--model", default="dien", choices=("din", "dien", "dmin"))
    p.add_argument("--keep", help="write the checkpoint, package and batch files here (kept)")
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="ik_serving_") as scratch:
        tmp = args.keep or scratch
        os.makedirs(tmp, exist_ok=True)
        ck, pkg = os.path.join(tmp, "ck.pt"), os.path.join(tmp, "model.pt2")
        _run([py, "-m", "interest_kernels.train", "--model", args.model, "--epochs", "1", "--max-steps", "3",
              "--device", "cpu", "--checkpoint", ck, "--quiet"], "train")
        _run([py, "-m", "interest_kernels.export", "--model", args.model, "--checkpoint", ck, "--out", pkg,
              "--config", "aot_inductor.compile_wrapper_opt_level=O0"], "export")
        model = load_checkpoint_model(ck)
        score, cand = _inputs(model, rows=7, candidates=11, steps=model.positions.num_embeddings
                              if hasattr(model, "positions") else 9)
        with torch.no_grad():
            expected = {"score": ScoringModule(model)(*score.values()),
                        "candidates": CandidateScoringModule(model)(*cand.values())}
        worst = 0.0
        for entry, inputs in (("score", score), ("candidates", cand)):
            src, dst = os.path.join(tmp, f"{entry}.in"), os.path.join(tmp, f"{entry}.out")
            write_tensors(src, inputs)
            _run([args.runner, pkg, entry, src, dst, "--ops", args.ops], f"ik_serve {entry}")
            got = read_tensors(dst)["scores"]
            if got.shape != expected[entry].shape:
                sys.exit(f"{entry}: runner gave shape {tuple(got.shape)}, eager {tuple(expected[entry].shape)}")
            err = float((got - expected[entry]).abs().max())
            worst = max(worst, err)
            print(f"{entry}: {got.numel()} scores, max |runner - eager| = {err:.2e}")
        if args.model == "dien":
            done = subprocess.run([args.runner, pkg, "score", src, dst], capture_output=True, text=True)
            if done.returncode == 0 or "interest_kernels::gru_scan_forward" not in done.stderr:
                sys.exit(f"without --ops the runner should fail on interest_kernels::gru_scan_forward:\n"
                         f"{done.stderr[:2000]}")
            print("without --ops: fails as it should, naming interest_kernels::gru_scan_forward")
        if not worst <= 1e-5:
            sys.exit(f"runner and eager scores differ by {worst:.2e} > 1e-5")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
