"""`make bench`: every benchmark, results merged into runs/bench/results.json (several minutes;
the CNN comparisons dominate).

Each benchmark runs in a process of its own, so one that fails, or that XLA aborts (the
4-device runners on a machine whose cores other processes hold), is recorded in
results.json as ``{"error": ..., "output_tail": ...}`` and the others still run; its entries from
an earlier run are removed first, so an old figure is never read as this run's. The exit code is
1 when any benchmark failed.

    python benchmarks/run_all.py                      # all of them
    python benchmarks/run_all.py --only lm_sampler,lm_loading
    python benchmarks/run_all.py --fail data_pipeline # make one fail on purpose: the rest still run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _data_pipeline():
    import data_pipeline
    from common import write

    r = data_pipeline.run()
    write("data_pipeline", r)
    print(
        f"data_pipeline: ratio {r['ratio']:.3f} ({r['jkd_images_per_s']:.0f} vs "
        f"{r['comparison_images_per_s']:.0f} img/s; target >= {r['target']})"
    )


def _chunked_soft_loss():
    import chunked_loss
    from common import write

    c = chunked_loss.run()
    write("chunked_soft_loss", c)
    print(
        f"chunked_soft_loss: peak x{c['ratio']:.2f}, temporaries x{c['temp_ratio']:.1f}, "
        f"time ratio {c['time_ratio']:.2f}"
    )


def _projected_soft_loss():
    import projected_loss
    from common import write

    f = projected_loss.run()
    write("projected_soft_loss", f)
    print(f"projected_soft_loss: peak saving x{f['ratio']:.1f}, time ratio {f['time_ratio']:.2f}")


def _batchnorm():
    import batchnorm
    from common import write

    n = batchnorm.run()
    write("batchnorm", n)
    print(
        f"batchnorm: jkd {n['ms']['jkd_batchnorm']:.1f} ms vs flax {n['ms']['flax_batchnorm']:.1f} ms "
        f"(ratio {n['ratio']:.2f})"
    )


def _vs_torch():
    import vs_torch
    from common import write

    for pair in vs_torch.PAIRS:
        v = vs_torch.run(pair)
        write(f"vs_torch_{pair}", v)
        print(
            f"vs_torch {v['pair']}: ratio {v['ratio']:.2f} ({v['jkd_images_per_s']:.0f} vs "
            f"{v['comparison_images_per_s']:.0f} img/s), {100 * v['jkd_fraction_of_peak']:.0f}% of matmul peak"
        )


def _stored_teacher():
    import stored_teacher
    from common import write

    s = stored_teacher.run()
    write("stored_teacher", s)
    print(
        f"stored_teacher: ratio {s['ratio']:.2f} of ideal {s['ideal']:.2f}; accuracy online "
        f"{s['online_test_accuracy']:.4f} vs stored {s['stored_test_accuracy']:.4f}"
    )


def _lm_sampler():
    import lm_sampler
    from common import write

    for name in lm_sampler.CONFIGS:
        r = lm_sampler.run(name)
        write(f"lm_sampler_{name}", r)
        print(lm_sampler.report(r))


def _module(name: str, entry: str | None = None):
    """A benchmark module with ``run()`` and ``report(result)``, written as ``entry``."""

    def go():
        import importlib

        from common import write

        mod = importlib.import_module(name)
        r = mod.run()
        write(entry or name, r)
        print(mod.report(r))

    return go


def _many_students():
    import many_students
    from common import write

    m = many_students.run("cnn", sequential=True)
    write("many_students_cnn_sequential", m)
    print(f"many_students {m['pair']}: ratio {m['ratio']:.2f} of ideal {m['ideal']:.2f}")


def _gap_methods():
    import gap_methods
    from common import write

    r = gap_methods.run()
    write("gap_methods", r)
    print(
        "gap_methods: " + ", ".join(f"{k} x{v:.2f}" for k, v in r["ratio_vs_soft_kd"].items()) + " of soft KD per step"
    )


# name -> (the entries it writes: a name or a prefix ending in "_"; what runs it). "runners" is a
# script of its own: it sets 4 CPU devices before JAX starts.
BENCHMARKS = {
    "runners": ("runners_", None),
    "data_pipeline": ("data_pipeline", _data_pipeline),
    "chunked_soft_loss": ("chunked_soft_loss", _chunked_soft_loss),
    "projected_soft_loss": ("projected_soft_loss", _projected_soft_loss),
    "batchnorm": ("batchnorm", _batchnorm),
    "vs_torch": ("vs_torch_", _vs_torch),
    "stored_teacher": ("stored_teacher", _stored_teacher),
    "lm_sampler": ("lm_sampler_", _lm_sampler),
    "lm_loading": ("lm_loading", _module("lm_loading")),
    "lm_fused_loss": ("lm_fused_loss", _module("lm_fused_loss")),
    "lm_demo_steps": ("lm_demo_steps", _module("lm_demo_steps")),
    "lm_kd_step": ("lm_kd_step", _module("lm_kd_step")),
    "lm_vocab_sharded": ("lm_vocab_sharded", None),  # 4 devices: its own process sets them
    "lm_mesh_step": ("lm_mesh_step", None),
    "lm_gguf_edge": ("lm_gguf_edge", None),
    "lm_cross_loss": (
        "lm_cross_loss",
        _module("lm_cross_loss"),
    ),  # llama.cpp's speed where llama-cpp-python is installed
    "many_students": ("many_students_", _many_students),
    "multihost": ("multihost", _module("multihost")),
    "gap_methods": ("gap_methods", _gap_methods),
}

HERE = Path(__file__).resolve().parent


def _command(name: str) -> list[str]:
    if BENCHMARKS[name][1] is None:
        return [sys.executable, str(HERE / f"{name}.py")]
    return [sys.executable, str(HERE / "run_all.py"), "--one", name]


def run_each(names: list[str], *, fail: frozenset[str] = frozenset(), results: Path | None = None) -> dict[str, str]:
    """Run ``names`` one process each; returns ``{name: error}`` for those that failed (also
    recorded in the results file). ``fail``: benchmarks made to fail at once (the isolation check)."""
    import common

    path = results or common.RESULTS
    failures = {}
    for name in names:
        entries = BENCHMARKS[name][0]
        common.forget(entries, path)
        cmd = (
            [sys.executable, "-c", f"raise SystemExit('{name}: failed on purpose (--fail)')"]
            if name in fail
            else _command(name)
        )
        print(f"== {name}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:  # shown as it comes, its end kept for the record
            sys.stdout.write(line)
            tail = (tail + [line.rstrip("\n")])[-30:]
        code = proc.wait()
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            failures[name] = how
            common.write(
                entries.rstrip("_") if entries.endswith("_") else entries,
                {"error": f"{name} failed ({how})", "output_tail": tail},
                path,
            )
            print(f"== {name} FAILED ({how}); recorded in {path}, the others still run", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated benchmark names")
    parser.add_argument(
        "--fail",
        type=lambda s: frozenset(s.split(",")),
        default=frozenset(),
        help="make these fail at once (checks that one failure leaves the others running)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: run this one here
    args = parser.parse_args(argv)
    if args.one is not None:
        BENCHMARKS[args.one][1]()
        return 0
    names = args.only or list(BENCHMARKS)
    unknown = [n for n in names + sorted(args.fail) if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    failures = run_each(names, fail=args.fail)
    if failures:
        print(
            f"{len(failures)} of {len(names)} benchmarks failed: "
            + ", ".join(f"{n} ({h})" for n, h in failures.items()),
            file=sys.stderr,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
