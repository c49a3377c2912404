"""A quick end-to-end check of the keyed memory on a GPU (session 19).

    python benchmarks/keyed_check.py MODEL N_PEOPLE FACTS_EACH   # MODEL: a GGUF path

Injects the facts, naps into the keyed memory, and prints recall (MEMIT, keyed, after a
restart, after forgetting one fact, after a second nap and a deep sleep), perplexity
against the base model and locality.
"""
import time, shutil, sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
from sleepwake.synthetic import fictional_facts
from sleepwake.evaluate import evaluate_facts
from sleepwake.models import load_model
model, n, rel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lm = load_model(model, device="cuda", progress=False)
home = "/tmp/k1home"; shutil.rmtree(home, ignore_errors=True)
facts = fictional_facts(n, rel, seed=3)
mem = Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False)
t=time.time(); mem.inject(facts); print("inject", round(time.time()-t,1), flush=True)
r = evaluate_facts(mem.model, mem.tokenizer, facts, None, progress=False); print("memit raw/chat", r.raw_recall, r.chat_recall, mem.perplexity(), "base", mem.base_perplexity(), "loc", mem.locality(), flush=True)
t=time.time(); rep = mem.nap(); print("nap", round(time.time()-t,1), rep.status, rep.reason, len(rep.consolidated), rep.kept, rep.ppl_before, rep.ppl_after, rep.ppl_base, rep.locality_before, rep.locality_after, rep.phases, flush=True)
r = evaluate_facts(mem.model, mem.tokenizer, facts, None, progress=False); print("keyed raw/chat", r.raw_recall, r.chat_recall, flush=True)
for f in r.facts[:6]: print("  ", f.subject, f.relation, f.object, "|", f.raw_completion[:40].replace("\n"," "), "|", f.chat_answer[:50].replace("\n"," "))
st = mem.status(measure_perplexity=False); print(st["facts"], st["keyed_subjects"])
print(mem.ask("What is the capital of France?"), "|", mem.complete("The Eiffel Tower is in"))
mem.close()
mem = Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False)
r = evaluate_facts(mem.model, mem.tokenizer, facts, None, progress=False); print("restart raw/chat", r.raw_recall, r.chat_recall, flush=True)
rec = mem.facts()[0]; mem.forget(rec.id)
r = evaluate_facts(mem.model, mem.tokenizer, facts, None, progress=False); print("after forget", [(f.raw_ok, f.chat_ok) for f in r.facts][:6])
print([(x.id, x.where) for x in mem.facts()][:8])
rep = mem.nap(); print("nap2", rep.status, rep.reason, len(rep.consolidated), rep.kept)
r = evaluate_facts(mem.model, mem.tokenizer, facts, None, progress=False); print("after nap2", [(f.raw_ok, f.chat_ok) for f in r.facts][:6], r.raw_recall, r.chat_recall)
rep = mem.sleep(); print("deep", rep.status, rep.reason, rep.phases, rep.ppl_after, rep.locality_after)
r = evaluate_facts(mem.model, mem.tokenizer, facts, None, progress=False); print("after deep", r.raw_recall, r.chat_recall)
