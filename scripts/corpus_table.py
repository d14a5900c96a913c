"""Turn the corpus results (corpus.jsonl, written by tests/gpu/test_gpu_corpus.py) into the
markdown table of docs/CORPUS.md. usage: corpus_table.py corpus.jsonl [card and date line]"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| case | result | nodes | kernels | file | notes |")
print("| --- | --- | --- | --- | --- | --- |")
for r in sorted(rows, key=lambda r: r["case"]):
    if r["result"] == "bit-exact":
        nodes = ", ".join(f"{t} {c}" for t, c in sorted(r["nodes"].items()))
        note = f"{r['replays']} replays" + (f", outputs change across replays: "
                                           f"{', '.join(r['changing_outputs'][:4])}"
                                           if r.get("changing_outputs") else "")
        print(f"| {r['case']} | bit-exact | {nodes} | {r['kernels']} | "
              f"{r['file_bytes'] / 1e6:.1f} MB | {note} |")
    else:
        err = r["error"].replace("|", "/").replace("\n", " ")[:200]
        print(f"| {r['case']} | **fails** at {r['stage']} | | | | {err} |")
