"""Where lifelong recall is lost with the keyed memory (issue #25 diagnosis, session 19).

    python benchmarks/keyed_diag.py MODEL N [THRESHOLD]      # MODEL: a GGUF path; needs a GPU (cuda)

Tells N shuffled facts (`lifelong_facts`, seed 1) in batches of 5 with auto sleep, then
prints: recall (teacher-forced, raw and raw+chat), where the failing facts live, which
entry each failing fact's keys match at the keyed memory's match layer, and the recall of
the consolidated facts with MEMIT's edits in and out of the model.
"""
import sys, shutil, time, collections, torch, torch.nn.functional as F
from dataclasses import replace
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
from sleepwake.synthetic import lifelong_facts
from sleepwake.evaluate import held
from sleepwake.models import load_model
from sleepwake.memit.requests import build_requests
model, n = sys.argv[1], int(sys.argv[2])
thr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.75
lm = load_model(model, device="cuda", progress=False)
home = "/tmp/diag"; shutil.rmtree(home, ignore_errors=True)
facts = lifelong_facts(n, seed=1)
cfg = MemoryConfig(progress=False, auto_sleep=True, keyed_threshold=thr)
mem = Memory(lm, home=home, config=cfg, progress=False)
t = time.time()
for i in range(0, n, 5):
    mem.inject(facts[i:i+5])
print("told", n, "in", round(time.time()-t), "s;", mem.status(measure_perplexity=False)["facts"], "history", collections.Counter((c["kind"], c["status"]) for c in mem.history()), flush=True)
ok_raw = held(mem.model, mem.tokenizer, facts, chat=False)
ok_both = held(mem.model, mem.tokenizer, facts, chat=True)
print("raw", sum(ok_raw)/n, "both", sum(ok_both)/n, flush=True)
where = {r.fact.key: r.where for r in mem.facts()}
live = mem.keyed_live()
print("entries", len(mem._keyed or []), "live", len(live or []))
fails = [f for f, o in zip(facts, ok_both) if not o]
print("fails by place", collections.Counter(where.get(f.key) for f in fails))
# keys at layer L for failing facts, nearest entry
ed = mem.editor()
reqs = build_requests(fails[:60], mem.tokenizer, replace(ed.cfg, chat_edit=True, key_positions="subject"))
keys = ed.keys_at(reqs, mem.layers[0])  # the match layer
names = list(live.entries) if live else []
K = F.normalize(torch.cat([live.entries[s].keys for s in names]).cuda(), dim=-1)
owner = [s for s in names for _ in range(len(live.entries[s].keys))]
sims = F.normalize(keys, dim=-1) @ K.T
stat = collections.Counter()
for q, srow in zip(reqs, sims):
    best, idx = srow.max(0)
    own = [i for i, o in enumerate(owner) if o == q.subject]
    own_best = srow[own].max().item() if own else float("nan")
    other = srow.clone(); other[own] = -1
    tag = ("no-entry" if not own else "own" if owner[idx] == q.subject and best >= thr else
           "below-thr" if owner[idx] == q.subject else "collision")
    stat[(q.kind, tag)] += 1
    if tag in ("collision", "below-thr") and stat[(q.kind, tag)] <= 4:
        print(f"  {q.kind} {q.subject!r}: own {own_best:.3f} best other {other.max().item():.3f} ({owner[other.argmax()]!r}) thr {thr}")
print(stat)
# all facts of live subjects: self-similarity margin
cons = [r.fact for r in mem.facts() if r.where == "consolidated"]
both_now = held(mem.model, mem.tokenizer, cons, chat=True)
mem._rebuild([], [], mem._keyed)   # MEMIT edits out, the whole table read
both_clean = held(mem.model, mem.tokenizer, cons, chat=True)
print("consolidated facts", len(cons), "recall with MEMIT in", sum(both_now)/len(cons), "MEMIT out", sum(both_clean)/len(cons), flush=True)
mem._rebuild([], [], None)
print("base says", sum(held(mem.model, mem.tokenizer, cons, chat=True))/len(cons))
