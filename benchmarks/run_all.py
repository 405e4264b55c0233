"""`make bench`: every benchmark, results merged into runs/bench/results.json."""

import chunked_loss
import data_pipeline

if __name__ == "__main__":
    r = data_pipeline.run()
    data_pipeline.write("data_pipeline", r)
    print(f"data_pipeline: ratio {r['ratio']:.3f} ({r['jkd_images_per_s']:.0f} vs "
          f"{r['comparison_images_per_s']:.0f} img/s; target >= {r['target']})")
    c = chunked_loss.run()
    data_pipeline.write("chunked_soft_loss", c)
    print(f"chunked_soft_loss: peak x{c['ratio']:.2f}, temporaries x{c['temp_ratio']:.1f}, "
          f"time ratio {c['time_ratio']:.2f}")
