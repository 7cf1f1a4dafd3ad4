"""What makes a training step cheaper must not change what it computes: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import TINY_RUN
from loragrid import tokenized
from loragrid import train as training


def tokenized_split(tiny_model_dir, prepared_dir):
    tokenizer = tokenized.load_tokenizer(tiny_model_dir)
    dataset, _ = tokenized.build_dataset(tokenizer, "chat", prepared_dir, {**TINY_RUN, "cutoff_len": 512})
    return tokenizer, dataset


def first_features(tiny_model_dir, prepared_dir, count=4):
    tokenizer, dataset = tokenized_split(tiny_model_dir, prepared_dir)
    columns = ("input_ids", "attention_mask", "labels")
    return tokenizer, [{key: dataset[i][key] for key in columns} for i in range(count)]


def loss_and_gradients(model, batch, num_items_in_batch):
    model.zero_grad()
    output = model(**batch, num_items_in_batch=num_items_in_batch)
    output.loss.backward()
    return output, [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("normalised_by", ["mean", "num_items_in_batch"])
def test_logits_only_where_labelled_give_the_models_own_loss_and_gradients(tiny_model_dir, prepared_dir, packing,
                                                                           normalised_by):
    tokenizer, features = first_features(tiny_model_dir, prepared_dir)
    everywhere = training.data_collator(tokenizer, packing, labelled_logits_only=False)(features)
    labelled = training.data_collator(tokenizer, packing, labelled_logits_only=True)(features)
    trained_positions = (everywhere["labels"][..., 1:] != -100).sum()
    num_items = trained_positions if normalised_by == "num_items_in_batch" else None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")

    full, full_gradients = loss_and_gradients(model, everywhere, num_items)
    selected, selected_gradients = loss_and_gradients(model, labelled, num_items)

    # The model projected only the positions whose next token is trained on.
    assert full.logits.shape[:-1] == everywhere["input_ids"].shape
    assert selected.logits.shape[:-1] == (trained_positions,)
    assert trained_positions < everywhere["input_ids"].numel()
    torch.testing.assert_close(selected.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert len(selected_gradients) == len(full_gradients)
    for ours, theirs in zip(selected_gradients, full_gradients):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_the_mask_is_used_only_where_the_model_takes_one(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert training.takes_logits_mask(model)
    assert training.takes_logits_mask(get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")))

    class OwnHead(torch.nn.Module):  # like remote code that slices its hidden states itself
        def forward(self, input_ids, logits_to_keep=0):
            return input_ids[:, -logits_to_keep:]

    assert not training.takes_logits_mask(OwnHead())


def test_a_run_records_that_its_logits_were_cut(tiny_model_dir, prepared_dir, tmp_path):
    summary = training.train(tiny_model_dir, prepared_dir, tmp_path / "run", TINY_RUN, "chat")
    assert summary["logits_only_where_labelled"] is True
    assert summary["steps"] == TINY_RUN["max_steps"]


def test_the_flop_count_is_transformers_own(tiny_model_dir, prepared_dir, tmp_path):
    tokenizer, dataset = tokenized_split(tiny_model_dir, prepared_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = training.make_trainer(model, tokenizer, dataset, TINY_RUN, 4, tmp_path, saving=False)
    batch = next(iter(trainer.get_train_dataloader()))
    recounted_every_step = transformers.Trainer.floating_point_ops(trainer, batch)
    assert trainer.floating_point_ops(batch) == recounted_every_step > 0


def test_a_training_forward_returns_its_loss_without_the_logits(tiny_model_dir, prepared_dir):
    tokenizer, features = first_features(tiny_model_dir, prepared_dir)
    batch = training.data_collator(tokenizer, packing=False, labelled_logits_only=True)(features)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules="all-linear"))
    before = model(**batch)
    training.causal_lm(model).register_forward_hook(training.return_loss_without_logits)

    model.train()
    trained = model(**batch)
    assert "logits" not in trained and trained.logits is None
    torch.testing.assert_close(trained.loss, before.loss)
    trained.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Evaluation and generation keep them.
    model.eval()
    assert model(**batch).logits is not None
    model.train()
    assert model(input_ids=batch["input_ids"]).logits is not None  # no labels, no loss


def test_training_runs_with_the_objects_before_it_out_of_full_collections(tiny_model_dir, prepared_dir, tmp_path,
                                                                          monkeypatch):
    import gc

    frozen_during_training = []
    library_train = transformers.Trainer.train

    def observed_train(self, *args, **kwargs):
        frozen_during_training.append(gc.get_freeze_count())
        return library_train(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", observed_train)
    assert gc.get_freeze_count() == 0
    training.train(tiny_model_dir, prepared_dir, tmp_path / "run", TINY_RUN, "chat")
    assert frozen_during_training[0] > 10_000  # the model, tokenizer and libraries
    assert gc.get_freeze_count() == 0  # collectable again afterwards
