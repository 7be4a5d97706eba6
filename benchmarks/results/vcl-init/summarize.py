"""First-task and after-task-2 accuracies (test and validation) of bench JSONs: ``python summarize.py DIR...``."""

import json
import pathlib
import sys

for d in sys.argv[1:]:
    for f in sorted(pathlib.Path(d).glob("*/*.json")):
        r = json.loads(f.read_text())
        for s in r["per_seed"]:
            m, v = s["accuracy_matrix"], s["val_accuracy_matrix"]
            k = len(m)
            print(f"{r['scenario']:22s} {r['strategy']:18s} seed {s['seed']} "
                  f"first-task test {100 * m[0][0]:6.2f} val {100 * v[0][0]:6.2f} | "
                  f"after task 2 avg test {100 * sum(m[1][:2]) / 2:6.2f} val {100 * sum(v[1][:2]) / 2:6.2f} | "
                  f"final ({k} tasks) avg test {100 * s['avg_accuracy']:6.2f} val {100 * sum(v[-1]) / k:6.2f} | "
                  f"{r['wall_seconds']['mean']:.0f} s")
