"""Encoding, host indices, packing budgets, collators, determinism and iterator state."""
import json

import numpy as np
import pytest

from bbu_jax.data import chat, convert, synthetic
from bbu_jax.data.batch import check_batch
from bbu_jax.data.collate import Budgets, collate
from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.pipeline import DataSpec, PackedBatchDataset, build_inference_inputs, make_eval_batches
from bbu_jax.data.pipeline import make_train_iterator, train_stream
from bbu_jax.data.schema import load_records
from bbu_jax.models.qwen2_5_vl.processing import normalize_rows, preprocess_image
from bbu_jax.models.qwen2_5_vl.processing import prepare_hf_batch

PIX = dict(min_pixels=3136, max_pixels=56 * 56 * 8)
BUDGETS = Budgets(rows=2, tokens=1024, patches=768, segments=4, objects=8, caption_tokens=32,
                  vision_memory=64, text_memory=48)
KW = dict(teacher_ratio=0.7, max_teachers=2, language="en", seed=0, **PIX)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("data")
    synthetic.write_labelme_dataset(str(raw), num_images=14, seed=1)
    convert.convert_dataset(str(raw), "labelme", str(out), val_ratio=0.25, teacher_pool_size=3, seed=0,
                            language="en", progress=False, **PIX)
    return out


@pytest.fixture(scope="module")
def encoder(tiny_hf_dir):
    return SampleEncoder(str(tiny_hf_dir), language="en", **PIX)


def _spec(train_jsonl, teacher_pool_jsonl="", budgets=BUDGETS, **kw) -> DataSpec:
    args = dict(train_jsonl=str(train_jsonl), val_jsonl="", teacher_pool_jsonl=str(teacher_pool_jsonl),
                teacher_ratio=KW["teacher_ratio"], max_teachers=KW["max_teachers"], language=KW["language"],
                collator="packed", skip_bad_samples=False, workers=0, check_budgets_on_start=False,
                batch_rows=budgets.rows, token_budget=budgets.tokens, patch_budget=budgets.patches,
                segments_per_row=budgets.segments, pack_buffer=8, max_objects=budgets.objects,
                caption_tokens=budgets.caption_tokens, vision_memory_tokens=budgets.vision_memory,
                text_memory_tokens=budgets.text_memory, **PIX)
    args.update(kw)
    return DataSpec(**args)


def _train(data, tiny_hf_dir, budgets=BUDGETS, seed=0, **kw):
    spec = _spec(data / "train.jsonl", data / "teacher_pool.jsonl", budgets, **kw)
    return make_train_iterator(spec, _encoder(tiny_hf_dir), seed=seed)


def _encoder(tiny_hf_dir):
    return SampleEncoder(str(tiny_hf_dir), language="en", **PIX)


def test_single_sample_matches_hf_host_preparation(data, encoder):
    """A one-sample row equals what host.prepare_hf_batch makes of the HF-style inputs."""
    records, _ = load_records(data / "train.jsonl")
    pool, _ = load_records(data / "teacher_pool.jsonl")
    rec = records[0]
    teachers = (pool[0].student, pool[1].student)
    s = encoder.encode(rec.student, teachers, source=rec.source, record_id=rec.id)
    batch, _ = collate([[s]], BUDGETS)
    check_batch(batch, BUDGETS.dims())
    from PIL import Image
    imgs = [preprocess_image(Image.open(p), **PIX) for ex in (*teachers, rec.student) for p in ex.images]
    ids = encoder.ids
    ref = prepare_hf_batch(s.input_ids[None], None, np.concatenate([r for r, _ in imgs]),
                           np.stack([g for _, g in imgs]), image_token_id=ids["<|image_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], patch_budget=BUDGETS.patches)
    L = s.num_tokens
    for k in ("input_ids", "segment_ids", "vision_token_index"):
        np.testing.assert_array_equal(batch[k][0, :L], ref[k][0], err_msg=k)
    np.testing.assert_array_equal(batch["positions"][0, :, :L], ref["positions"][0])
    for k in ("patch_pos", "patch_window_ids", "patch_image_ids"):
        np.testing.assert_array_equal(batch[k][0], ref[k][0], err_msg=k)
    n = s.num_patches  # the batch's uint8 pixels are the processor's rows once normalized
    np.testing.assert_array_equal(normalize_rows(batch["patches"][0, :n]), ref["patches"][0, :n])
    assert not batch["patches"][0, n:].any()


def test_batch_contents(data, encoder, tiny_hf_dir):
    tok = encoder.tokenizer
    it = _train(data, tiny_hf_dir)
    pad = encoder.ids["<|image_pad|>"]
    for _ in range(3):
        b = next(it)
        check_batch(b, BUDGETS.dims())
        for r in range(BUDGETS.rows):
            seg = b["segment_ids"][r]
            assert seg.max() == b["segment_valid"][r].sum() >= 1
            n_img = 0
            for k in range(1, seg.max() + 1):
                tok_idx = np.flatnonzero(seg == k)
                assert (np.diff(tok_idx) == 1).all()  # never split
                assert b["positions"][r, :, tok_idx[0]].tolist() == [0, 0, 0]
                kinds = b["target_kind"][r, tok_idx]
                # shifted targets: target at t is the next token of the same segment
                sup = tok_idx[:-1][kinds[:-1] > 0]
                np.testing.assert_array_equal(b["targets"][r, sup], b["input_ids"][r, sup + 1])
                assert kinds[-1] == 0 and (kinds == 2).any()
                student = tok.decode(b["targets"][r, tok_idx[kinds == 2]])
                assert student.endswith("<|im_end|>")
                answer = json.loads(student[len("```json\n"):-len("\n```<|im_end|>")])
                m = b["gt_valid"][r, k - 1]
                assert m.sum() == len(answer)
                # det memory: student image pads and instruction tokens only, never answer tokens
                vi = b["det_vision_index"][r, k - 1][b["det_vision_mask"][r, k - 1]]
                ti = b["det_text_index"][r, k - 1][b["det_text_mask"][r, k - 1]]
                assert (b["input_ids"][r, vi] == pad).all() and (seg[vi] == k).all() and (seg[ti] == k).all()
                assert tok.decode(b["input_ids"][r, ti]) == chat.INSTRUCTIONS["en"]
                assert (b["target_kind"][r, np.concatenate([vi, ti])] == 0).all()
                assert vi[-1] == tok_idx[b["input_ids"][r, tok_idx] == pad][-1]  # the student's image is last
                pos = b["det_vision_pos"][r, k - 1][b["det_vision_mask"][r, k - 1]]
                assert (pos > 0).all() and (pos < 1).all()
                cap = b["gt_caption_ids"][r, k - 1][m]
                capm = b["gt_caption_mask"][r, k - 1][m]
                descs = [tok.decode(c[cm][:-1]) for c, cm in zip(cap, capm)]
                assert sorted(descs) == sorted(o["desc"] for o in answer)
                assert all(c[cm][-1] == encoder.ids["<|im_end|>"] for c, cm in zip(cap, capm))
                n_img += 1
            # merged tokens: every image pad points at a distinct merged token of a real patch group
            vti = b["vision_token_index"][r]
            used = vti[vti >= 0]
            assert (b["input_ids"][r, vti >= 0] == pad).all() and len(set(used.tolist())) == len(used)
            assert len(used) * 4 == (b["patch_image_ids"][r] > 0).sum()
            # window/image ids unique per segment: a window never spans two images
            wid, iid = b["patch_window_ids"][r], b["patch_image_ids"][r]
            for w_ in np.unique(wid[wid > 0]):
                assert len(np.unique(iid[wid == w_])) == 1
    it.close()


def test_boxes_match_answer_text(data, encoder):
    rec = load_records(data / "val.jsonl")[0][0]
    s = encoder.encode(rec.student, (), source=rec.source, record_id=rec.id)
    rh, rw = s.meta["resized_hw"]
    tok = encoder.tokenizer
    text = tok.decode(s.targets[s.target_kind == 2])
    answer = json.loads(text[len("```json\n"):-len("\n```<|im_end|>")])
    xyxy = np.array([o["bbox_2d"] for o in answer], np.float32)
    want = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / rw, (xyxy[:, 1] + xyxy[:, 3]) / 2 / rh,
                     (xyxy[:, 2] - xyxy[:, 0]) / rw, (xyxy[:, 3] - xyxy[:, 1]) / rh], -1)
    got = s.gt_boxes
    order = np.lexsort((xyxy[:, 0], xyxy[:, 1]))
    np.testing.assert_allclose(np.sort(got, 0), np.sort(want[order], 0), atol=1e-6)
    # answer order: top-to-bottom then left-to-right
    assert [(o["bbox_2d"][1], o["bbox_2d"][0]) for o in answer] == sorted((o["bbox_2d"][1], o["bbox_2d"][0]) for o in answer)


def test_deterministic_and_state_restore(data, tiny_hf_dir):
    a = _train(data, tiny_hf_dir)
    first = [next(a) for _ in range(2)]
    state = a.get_state()
    assert state["carry"]  # samples wait in the packing buffer: the restore must bring them back
    rest = [next(a) for _ in range(3)]
    b = _train(data, tiny_hf_dir)
    for x, y in zip(first, [next(b) for _ in range(2)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    c = _train(data, tiny_hf_dir)
    c.set_state(json.loads(json.dumps(state)))
    for x, y in zip(rest, [next(c) for _ in range(3)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    other = next(_train(data, tiny_hf_dir, seed=1))
    assert not np.array_equal(other["input_ids"], first[0]["input_ids"])


def test_budgets_errors_and_skip(data, tiny_hf_dir, tmp_path):
    small = Budgets(rows=1, tokens=150, patches=768, segments=2, objects=8, caption_tokens=32,
                    vision_memory=64, text_memory=48)
    with pytest.raises(ValueError, match=r"train.jsonl:\d+: sample fits no row \(tokens \d+ > budget 150"):
        next(_train(data, tiny_hf_dir, small, teacher_ratio=0.0))
    few_objects = Budgets(**{**BUDGETS.__dict__, "objects": 3})
    with pytest.raises(ValueError, match=r"objects \d+ > budget 3"):
        next(_train(data, tiny_hf_dir, few_objects, teacher_ratio=0.0))
    it = _train(data, tiny_hf_dir, few_objects, teacher_ratio=0.0, skip_bad_samples=True)
    b = next(it)
    assert it.get_state()["skipped"] > 0 and b["gt_valid"].sum(-1).max() <= 3
    none_fit = Budgets(**{**BUDGETS.__dict__, "vision_memory": 1})
    with pytest.raises(ValueError, match="in a row were bad"):
        next(_train(data, tiny_hf_dir, none_fit, skip_bad_samples=True))
    # a bad record in the file names its line
    lines = (data / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["images"] = ["images/missing.jpg"]
    bad = data / "bad.jsonl"
    bad.write_text("\n".join([lines[1], json.dumps(rec)]) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: cannot read image"):
        for _ in range(3):
            next(make_train_iterator(_spec(bad, collator="standard", segments_per_row=1), _encoder(tiny_hf_dir),
                                         seed=0))


def test_standard_vs_packed_and_eval(data, tiny_hf_dir):
    std = next(_train(data, tiny_hf_dir, collator="standard", teacher_ratio=0.0))
    check_batch(std, BUDGETS.dims())
    assert (std["segment_valid"].sum(1) == 1).all()
    packed = next(_train(data, tiny_hf_dir, teacher_ratio=0.0))
    assert packed["segment_valid"].sum() > std["segment_valid"].sum()
    n_val = len(load_records(data / "val.jsonl")[0])
    metas = []
    for batch, m in make_eval_batches(str(data / "val.jsonl"), _encoder(tiny_hf_dir), BUDGETS):
        check_batch(batch, BUDGETS.dims())
        assert batch["segment_valid"].sum() == sum(len(r) for r in m)
        metas += [s for r in m for s in r]
    ids = [json.loads(line)["id"] for line in (data / "val.jsonl").read_text().splitlines()]
    assert [s["id"] for s in metas] == ids and len(ids) == n_val
    assert all(s["num_teachers"] == 0 and s["resized_hw"][0] % 28 == 0 for s in metas)


def test_inference_inputs(data, encoder):
    rec = load_records(data / "val.jsonl")[0][0]
    pool = load_records(data / "teacher_pool.jsonl")[0]
    batch, info = build_inference_inputs(encoder, rec.student.images, [pool[0].student])
    check_batch(batch, info["budgets"].dims())
    tok = encoder.tokenizer
    assert tok.decode(batch["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (batch["target_kind"][0] == 1).any() and not (batch["target_kind"][0] == 2).any()
    L = batch["input_ids"].shape[1]
    assert info["rope_delta"] == batch["positions"].max() + 1 - L


def test_worker_iterator_state_restore(data, tiny_hf_dir):
    """With grain multiprocessing workers the saved state replays the same batches."""
    a = _train(data, tiny_hf_dir, workers=1)
    next(a)
    state = a.get_state()
    want = [next(a)["input_ids"] for _ in range(2)]
    a.close()
    b = _train(data, tiny_hf_dir, workers=1)
    b.set_state(state)
    got = [next(b)["input_ids"] for _ in range(2)]
    b.close()
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x, y)


def test_epoch_packs_every_sample_once_within_budgets(data, tiny_hf_dir):
    """One epoch of the train stream (the endless stream's first records, teacher draws included)
    through the best-fit packer: every record lands in exactly one row. Rows stay within every
    budget: the batch's shapes are the budgets, and collate cannot write past them."""
    spec = _spec(data / "train.jsonl", data / "teacher_pool.jsonl")
    stream, epoch = train_stream(spec, _encoder(tiny_hf_dir), seed=0)
    ds = PackedBatchDataset(stream[:epoch], BUDGETS, segments_per_row=BUDGETS.segments, buffer=6,
                            skip_bad_samples=False, with_meta=True, epoch_size=epoch)
    seen = []
    for batch, metas in ds:
        check_batch(batch, BUDGETS.dims())
        assert batch["segment_valid"].sum() == sum(len(m) for m in metas)
        for row in metas:
            assert len(row) <= BUDGETS.segments
            assert [m["segment"] for m in row] == list(range(1, len(row) + 1))
        seen += [m["id"] for row in metas for m in row]
    ids = [json.loads(line)["id"] for line in (data / "train.jsonl").read_text().splitlines()]
    assert sorted(seen) == sorted(ids)
