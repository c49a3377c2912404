"""Probe MEMIT settings on the 20 subjects × 3 relations fact set, batch by batch.

Prints perplexity and the largest per-fact delta norm after every batch, then raw
and chat recall of all facts. Used for the λ choice (BENCHMARKS.md).

    python benchmarks/lambda_probe.py HOME N_FACTS '{"lambda_reg": 50}' [BATCH]
"""

import time, shutil, sys, json
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
from sleepwake.synthetic import fictional_facts
home = sys.argv[1]; n=int(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv)>3 else {}
bs = int(sys.argv[4]) if len(sys.argv)>4 else 5
shutil.rmtree(home, ignore_errors=True)
cfg = MemoryConfig(progress=False, batch_size=bs).with_memit(**extra)
m = Memory(home=home, config=cfg)
facts = fictional_facts(20, 3, seed=1)[:n]
m.editor(); ppl0 = m.perplexity(); print("ppl0", ppl0, flush=True)
for i in range(0, len(facts), bs):
    t=time.time(); res = m.inject(facts[i:i+bs]); dt=time.time()-t
    st = res.stats[0]
    norms = [float(sum(e.delta(l).norm() for l in e.a)) for e in m._edits.values()]
    print(f"batch {i//bs} {dt:.1f}s steps={st.v_steps} loss={st.v_loss_after:.3f} ppl={m.perplexity():.2f} maxnorm={max(norms):.1f}", flush=True)
r = m.evaluate(facts)
print("FINAL", len(facts), "raw", r.raw_recall, "chat", r.chat_recall, "ppl", r.ppl)
