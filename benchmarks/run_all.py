"""`make bench`: every benchmark, results merged into runs/bench/results.json (several minutes;
the CNN comparisons dominate)."""

import batchnorm
import chunked_loss
from common import write
import data_pipeline
import gap_methods
import lm_demo_steps
import lm_fused_loss
import lm_kd_step
import lm_loading
import lm_sampler
import many_students
import multihost
import projected_loss
import stored_teacher
import vs_torch

if __name__ == "__main__":
    import subprocess
    import sys
    from pathlib import Path

    # Its own process: it sets 4 CPU devices before JAX starts, which the others must not see.
    subprocess.run([sys.executable, str(Path(__file__).with_name("runners.py"))], check=True)
    r = data_pipeline.run()
    write("data_pipeline", r)
    print(f"data_pipeline: ratio {r['ratio']:.3f} ({r['jkd_images_per_s']:.0f} vs "
          f"{r['comparison_images_per_s']:.0f} img/s; target >= {r['target']})")
    c = chunked_loss.run()
    write("chunked_soft_loss", c)
    print(f"chunked_soft_loss: peak x{c['ratio']:.2f}, temporaries x{c['temp_ratio']:.1f}, "
          f"time ratio {c['time_ratio']:.2f}")
    f = projected_loss.run()
    write("projected_soft_loss", f)
    print(f"projected_soft_loss: peak saving x{f['ratio']:.1f}, time ratio {f['time_ratio']:.2f}")
    n = batchnorm.run()
    write("batchnorm", n)
    print(f"batchnorm: jkd {n['ms']['jkd_batchnorm']:.1f} ms vs flax {n['ms']['flax_batchnorm']:.1f} ms "
          f"(ratio {n['ratio']:.2f})")
    for pair in vs_torch.PAIRS:
        v = vs_torch.run(pair)
        write(f"vs_torch_{pair}", v)
        print(f"vs_torch {v['pair']}: ratio {v['ratio']:.2f} ({v['jkd_images_per_s']:.0f} vs "
              f"{v['comparison_images_per_s']:.0f} img/s), {100 * v['jkd_fraction_of_peak']:.0f}% of matmul peak")
    s = stored_teacher.run()
    write("stored_teacher", s)
    print(f"stored_teacher: ratio {s['ratio']:.2f} of ideal {s['ideal']:.2f}; accuracy online "
          f"{s['online_test_accuracy']:.4f} vs stored {s['stored_test_accuracy']:.4f}")
    for name in lm_sampler.CONFIGS:
        r = lm_sampler.run(name)
        write(f"lm_sampler_{name}", r)
        print(lm_sampler.report(r))
    r = lm_loading.run()
    write("lm_loading", r)
    print(lm_loading.report(r))
    r = lm_fused_loss.run()
    write("lm_fused_loss", r)
    print(lm_fused_loss.report(r))
    r = lm_demo_steps.run()
    write("lm_demo_steps", r)
    print(lm_demo_steps.report(r))
    r = lm_kd_step.run()
    write("lm_kd_step", r)
    print(lm_kd_step.report(r))
    m = many_students.run("cnn", sequential=True)
    write("many_students_cnn_sequential", m)
    print(f"many_students {m['pair']}: ratio {m['ratio']:.2f} of ideal {m['ideal']:.2f}")
    r = multihost.run()
    write("multihost", r)
    print(multihost.report(r))
    r = gap_methods.run()
    write("gap_methods", r)
    print("gap_methods: " + ", ".join(f"{k} x{v:.2f}" for k, v in r["ratio_vs_soft_kd"].items()) + " of soft KD per step")
