"""`make bench`: every benchmark, results merged into runs/bench/results.json."""

import data_pipeline

if __name__ == "__main__":
    r = data_pipeline.run()
    data_pipeline.write("data_pipeline", r)
    print(f"data_pipeline: ratio {r['ratio']:.3f} ({r['jkd_images_per_s']:.0f} vs "
          f"{r['comparison_images_per_s']:.0f} img/s; target >= {r['target']})")
