import torch

from piece_mm.batching import IGNORE_INDEX, collate, training_batches
from piece_mm.tasks import world


def test_labels_cover_exactly_the_answer_and_end_of_turn(tiny):
    alias, model, processor = tiny
    tok = processor.tokenizer
    examples = world.caption_set(11, 6) + world.task_set("count", "train", 6)
    batch = collate(processor, examples)
    for i, ex in enumerate(examples):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        answer = (labels != IGNORE_INDEX).nonzero().flatten()
        # the supervised tokens are one contiguous run at the end of the real (unpadded) sequence
        assert answer.tolist() == list(range(answer[0].item(), int(mask.sum())))
        assert (labels[answer] == ids[answer]).all()
        # independent computation: the answer's own tokens, then the template's end-of-turn (= eos) token
        expected = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[answer].tolist() == expected
        # nothing of the prompt, image tokens included, is supervised
        image_id = model.config.image_token_id
        assert not (labels[ids == image_id] != IGNORE_INDEX).any()


def test_loss_ignores_prompt_tokens(tiny):
    alias, model, processor = tiny
    ex = world.task_set("color", "train", 4)
    batch = collate(processor, ex)
    # Changing a prompt word leaves the targets unchanged; the loss is the model's mean NLL over answer tokens only.
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1]
        target = batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        ref = torch.nn.functional.cross_entropy(logits[keep].float(), target[keep])
    assert torch.allclose(out.loss, ref, atol=1e-5)


def test_training_order_depends_on_seed_only(tiny):
    alias, model, processor = tiny
    data = world.task_set("shape", "train", 10)
    a = [b["labels"] for b in training_batches(processor, data, 4, 5, seed=3)]
    b = [b["labels"] for b in training_batches(processor, data, 4, 5, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
