"""Where the edited layers read a subject (`MemitEditor.keys_at`, `subject_keys`): the keys
the keyed memory matches and a deep sleep reads again for every held subject."""

from __future__ import annotations

from dataclasses import replace

import torch

from sleepwake.facts import Fact
from sleepwake.inference import shared_prefix
from sleepwake.memit.requests import build_requests
from sleepwake.memit.trace import run_capture

FACTS = [
    Fact("Anselm Kreutzer", "lives in", "Lisbon"),
    Fact("Anselm Kreutzer", "works as a", "carpenter"),
    Fact("Zofia Wróblewska", "works as a", "veterinarian"),
    Fact("Mateus Okonkwo", "was born in", "Kraków"),
    Fact("Ilse Brandvold", "has a dog named", "Pepper"),
]


def test_keys_read_in_batches_are_those_of_each_prompt_read_alone(base_lm, cache_dir, tmp_path):
    """Batched chat questions run their shared system turn once: each row must still read
    what a pass over its prompt alone reads, and come back in the requests' order."""
    from sleepwake.memory import Memory

    lm = base_lm
    with Memory(lm, home=tmp_path / "home", cache_dir=cache_dir, progress=False) as mem:
        editor = mem.editor()
        requests = build_requests(FACTS, lm.tokenizer, replace(editor.cfg, chat_edit=True, key_positions="subject"))
        chats = [q.ids[: q.subject_pos + 1] for q in requests if q.kind == "chat"]
        assert shared_prefix(lm.model, chats, min(len(c) for c in chats) - 1)[0] >= 8  # the system turn is shared
        layer = editor.layers[0]
        read = editor.keys_at(requests, layer)
        assert read.keys.shape[0] == len(requests) == 2 * len(FACTS)
        for i, q in enumerate(requests):
            ids = torch.tensor([q.ids[: q.subject_pos + 1]], device=lm.device)
            alone = run_capture(lm.model, lm.arch, {"input_ids": ids}, key_layers=(layer,))[0][layer][0].float()
            assert torch.allclose(read.keys[i], alone[q.subject_pos], rtol=1e-4, atol=1e-4), (i, q.kind)
            if q.head_pos is not None:
                assert torch.allclose(read.heads[i], alone[q.head_pos], rtol=1e-4, atol=1e-4), (i, q.kind)
            else:
                assert not read.heads[i].any()
        # grouped by subject: both facts of one person, raw prompt and chat question each
        by_subject = editor.subject_keys(FACTS[:2])
        assert list(by_subject) == [requests[0].subject]
        assert by_subject[requests[0].subject].keys.shape[0] == 4
