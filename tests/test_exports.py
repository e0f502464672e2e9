"""Standard exports (issue 26, part 3): `defectfill export --to coco|hf|labelstudio|mvtec`, each read by its real
client: pycocotools decodes our masks equal to ours, `datasets` loads the imagefolder with image, mask and type,
Label Studio's converter reads our tasks' brush masks; prefixed names never collide with the real files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import run_with_stand_ins, tiny_run_config
from PIL import Image

from defectfill.cli import main
from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, open_layout
from defectfill.outputs.export import export, parse_formats, read_items


def _mask(seed, size=48):
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), bool)
    x, y = rng.integers(4, size - 16, 2)
    m[y:y + 9, x:x + 11] = True
    m[y + 3, x:x + 20] = True  # a thin tail: RLE must keep single pixels
    return m


def make_generated(root, category="disc", defect_type="spot", count=3, several=False):
    """A generate output as `defectfill generate` writes it: images, masks, manifest rows, generate.json."""
    (root / category / "test" / defect_type).mkdir(parents=True)
    (root / category / "ground_truth" / defect_type).mkdir(parents=True)
    rows = []
    for k in range(count):
        image = _rel(category, "test", defect_type, f"{k:03d}.png")
        mask = _rel(category, "ground_truth", defect_type, f"{k:03d}_mask.png")
        Image.fromarray((np.random.default_rng(k).random((48, 48, 3)) * 255).astype(np.uint8)).save(root / image)
        m = _mask(k)
        Image.fromarray(m.astype(np.uint8) * 255).save(root / mask)
        row = {"index": k, "image": image, "mask": mask, "source_image": f"/data/good/{k:03d}.png",
               "mask_source": "shape:blob", "prompt": "A photo of sks", "seed": 100 + k,
               "candidate_seeds": [1, 2], "scores": [0.5, 0.75], "chosen": 1}
        if several:
            (root / "defect_masks" / category / defect_type).mkdir(parents=True, exist_ok=True)
            own = []
            for i, t in enumerate(("spot", "scratch")):
                part = np.zeros_like(m)
                part[:, : 24] = m[:, :24] if i == 0 else False
                part[:, 24:] = m[:, 24:] if i == 1 else False
                path = _rel("defect_masks", category, defect_type, f"{k:03d}_{i}_{t}_mask.png")
                Image.fromarray(part.astype(np.uint8) * 255).save(root / path)
                own.append({"defect_type": t, "mask": path, "seed": k})
            row["defects"] = own
        rows.append(row)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "generate.json").write_text(json.dumps({"run": "/runs/disc-spot", "run_config_sha256": "abc123",
                                                    "settings": {}}))
    return root


def _rel(*parts):
    return "/".join(parts)


def test_coco_export_decodes_with_pycocotools_equal_to_our_masks(tmp_path):
    from pycocotools.coco import COCO

    gen = make_generated(tmp_path / "gen")
    assert main(["export", "--generated", str(gen), "--to", "coco", "--output", str(tmp_path / "out")]) == 0
    coco_dir = tmp_path / "out" / "coco"
    api = COCO(str(coco_dir / "annotations" / "instances_default.json"))
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == ["spot"]
    for image in api.loadImgs(api.getImgIds()):
        assert image["file_name"].startswith("synth_disc_spot_")  # never 000.png, the real files' names
        assert (coco_dir / "images" / image["file_name"]).is_file()
        k = int(image["file_name"][-7:-4])
        (ann,) = api.loadAnns(api.getAnnIds(imgIds=image["id"]))
        assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
        assert np.array_equal(api.annToMask(ann).astype(bool), _mask(k))  # pycocotools decodes ours exactly
        assert ann["area"] == _mask(k).sum()
        prov = image["defectfill"]  # the manifest's provenance in each image's fields
        assert prov["seed"] == 100 + k and prov["mask_source"] == "shape:blob" and prov["run_config_sha256"] == "abc123"
    # and defectfill's own coco import reads it back as a dataset of that type
    layout = open_layout(coco_dir)
    assert layout.name == "coco" and layout.defect_types("disc") == ["spot"]
    sample = layout.defect_samples("disc", "spot")[0]
    assert np.array_equal(load_mask(sample.mask), _mask(0))


def test_coco_export_writes_one_annotation_per_painted_defect(tmp_path):
    from pycocotools.coco import COCO

    gen = make_generated(tmp_path / "gen", several=True)
    export(gen, tmp_path / "out", ["coco"])
    api = COCO(str(tmp_path / "out" / "coco" / "annotations" / "instances_default.json"))
    assert sorted(c["name"] for c in api.loadCats(api.getCatIds())) == ["scratch", "spot"]
    anns = api.loadAnns(api.getAnnIds(imgIds=[1]))
    union = np.zeros((48, 48), bool)
    for ann in anns:
        union |= api.annToMask(ann).astype(bool)
    assert len(anns) == 2 and np.array_equal(union, _mask(0))


def test_hf_export_loads_with_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    gen = make_generated(tmp_path / "gen")
    export(gen, tmp_path / "out", ["hf"])
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out" / "hf"),
                               cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert {"image", "mask", "type", "category", "provenance"} <= set(ds.column_names)
    assert isinstance(ds.features["mask"], datasets.Image)  # decoded as an image, not a path string
    for row in ds:
        prov = json.loads(row["provenance"])
        k = prov["index"]
        assert row["type"] == "spot" and row["category"] == "disc"
        assert np.array_equal(np.asarray(row["mask"]) > 127, _mask(k))
        assert row["image"].size == (48, 48)


def test_labelstudio_tasks_read_by_label_studios_converter(tmp_path):
    pytest.importorskip("label_studio_converter")
    from label_studio_converter.brush import decode_rle
    from label_studio_converter.converter import Converter

    gen = make_generated(tmp_path / "gen")
    export(gen, tmp_path / "out", ["labelstudio"])
    ls = tmp_path / "out" / "labelstudio"
    tasks = json.loads((ls / "tasks.json").read_text())
    assert len(tasks) == 3 and all(t["data"]["image"].startswith("/data/local-files/?d=images/synth_") for t in tasks)
    assert tasks[0]["predictions"][0]["model_version"] == "defectfill"
    assert tasks[0]["predictions"][0]["score"] == 0.75  # the kept candidate's LFS score
    # Label Studio's converter parses our labeling config and reads the results (its reader takes a task's
    # annotations; a prediction's result has the same schema, so we hand it the predictions as annotations)
    converter = Converter(str(ls / "label_config.xml"), project_dir=str(ls), download_resources=False)
    as_annotations = [{"id": k, "data": t["data"], "annotations": [{"id": k, "result": t["predictions"][0]["result"]}]}
                      for k, t in enumerate(tasks)]
    (tmp_path / "as_annotations.json").write_text(json.dumps(as_annotations))
    read = list(converter.iter_from_json_file(str(tmp_path / "as_annotations.json")))
    assert len(read) == 3
    for item in read:
        k = json.loads(item["input"]["provenance"])["index"]
        (value,) = item["output"]["tag"]
        assert value["type"].lower() == "brushlabels" and value["brushlabels"] == ["spot"]
        mask = decode_rle(value["rle"]).reshape(value["original_height"], value["original_width"], 4)[..., 3] > 0
        assert np.array_equal(mask, _mask(k))


def test_mvtec_export_merges_into_the_real_dataset_without_collisions(tmp_path, demo_root):
    gen = make_generated(tmp_path / "gen", defect_type="scratch")
    export(gen, tmp_path / "out", ["mvtec"])
    real = tmp_path / "real"
    shutil.copytree(demo_root, real)
    before = len(open_layout(real).defect_samples("disc", "scratch"))
    shutil.copytree(tmp_path / "out" / "mvtec" / "disc", real / "disc", dirs_exist_ok=True)
    samples = open_layout(real).defect_samples("disc", "scratch")
    assert len(samples) == before + 3  # nothing overwritten
    assert all(s.mask is not None and s.mask.is_file() for s in samples)


def test_several_formats_and_a_run_folder_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    make_generated(run / "generated" / "disc-spot")
    make_generated(run / "generated" / "disc-scratch", defect_type="scratch")
    assert main(["export", "--generated", str(run), "--to", "coco,mvtec", "--output", str(tmp_path / "o",),
                 "--prefix", "gen-"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")) == ["coco", "mvtec"]
    names = sorted(p.name for p in (tmp_path / "o" / "coco" / "images").iterdir())
    assert len(names) == 6 and names[0] == "gen-disc_scratch_000.png"
    items = read_items(run)
    assert {i.defect_type for i in items} == {"spot", "scratch"}
    # exporting again replaces the format folder whole
    assert main(["export", "--generated", str(run / "generated" / "disc-spot"), "--to", "coco", "--output",
                 str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o" / "coco" / "images").iterdir())) == 3
    with pytest.raises(DefectFillError, match="choose one or more of coco, hf, labelstudio, mvtec"):
        parse_formats("coco,voc")
    assert main(["export", "--generated", str(tmp_path / "nothing"), "--to", "coco", "--output", str(tmp_path / "x")]) == 2
    assert main(["export", "--generated", str(run), "--to", "coco", "--output", str(tmp_path / "x"),
                 "--prefix", "../up"]) == 2
    err = capsys.readouterr().err
    assert "folder not found" in err and "--prefix '../up'" in err


def test_a_bare_mvtec_tree_exports_too(tmp_path):
    """A tree without a manifest (a run's synth/): images and masks by the MVTec layout, no provenance."""
    gen = make_generated(tmp_path / "gen")
    tree = tmp_path / "synth"
    shutil.copytree(gen / "disc", tree / "disc")
    items = read_items(tree)
    assert [i.name for i in items] == [f"synth_disc_spot_{k:03d}" for k in range(3)]
    assert np.array_equal(load_mask(items[1].mask), _mask(1))


def test_run_exports_after_synth(demo_root, tiny_model_dir, tmp_path):
    """`run --export coco,mvtec`: the run's generated images in <output>/export/, prefixed, with provenance."""
    from pycocotools.coco import COCO

    config = tiny_run_config(demo_root, tiny_model_dir, tmp_path / "work", defect_types=["spot"],
                             export="coco,mvtec", export_prefix="gen_")
    results = run_with_stand_ins(config)
    assert [r.status for r in results] == ["done"]
    api = COCO(str(tmp_path / "work" / "export" / "coco" / "annotations" / "instances_default.json"))
    images = api.loadImgs(api.getImgIds())
    assert len(images) == 2 and all(i["file_name"].startswith("gen_disc_spot_") for i in images)
    assert all(i["defectfill"]["source_image"] and "seed" in i["defectfill"] for i in images)
    gen = tmp_path / "work" / "generated" / "disc-spot"
    for image in images:
        (ann,) = api.loadAnns(api.getAnnIds(imgIds=image["id"]))
        stem = image["file_name"][len("gen_disc_spot_"):-4]
        assert np.array_equal(api.annToMask(ann).astype(bool),
                              load_mask(gen / "disc" / "ground_truth" / "spot" / f"{stem}_mask.png"))
    assert len(list((tmp_path / "work" / "export" / "mvtec" / "disc" / "test" / "spot").iterdir())) == 2
    with pytest.raises(DefectFillError, match="--export 'voc'"):
        tiny_run_config(demo_root, tiny_model_dir, tmp_path / "w2", export="voc").validate()
