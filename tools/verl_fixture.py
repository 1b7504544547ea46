"""Writes data/tests/fixtures/verl_tiny*.parquet: tiny datasets in verl's RL schema, written
exactly as verl's preprocessing scripts write them (Hugging Face `datasets`, `Dataset.map` then
`to_parquet`), so that ril's Parquet reader is pinned to files that come from Python.

- verl_tiny.parquet: geo3k-style (verl/examples/data_preprocess/geo3k.py): `images` is
  list<struct<bytes: binary, path: string>> (the `datasets.Image` feature), `prompt` is
  list<struct<role, content>> with `<image>` placeholders, `reward_model` and `extra_info` are
  structs. Three rows: one image, two images, no image (an empty list).
- verl_tiny_text.parquet: gsm8k-style (gsm8k.py): no `images` column at all.

Run once, not in CI (the fixtures are committed; the Rust tests in data/tests/parquet.rs assert
the values written here):

    python -m venv /work/fixture-venv && /work/fixture-venv/bin/pip install pyarrow datasets pillow
    /work/fixture-venv/bin/python tools/verl_fixture.py

Written with datasets 5.2.0, pyarrow 26.0.1, Pillow 13.0.0.
"""

import io
import os

import datasets
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tests", "fixtures")

INSTRUCTION = (
    r"You FIRST think about the reasoning process as an internal monologue and then provide the "
    r"final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    r"The final answer MUST BE put in \boxed{}."
)


def png(colour, size=(4, 3)):
    """A tiny solid-colour PNG, as a PIL image (no filename: `datasets` stores bytes, path None)."""
    image = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return Image.open(buf)


def geo3k():
    data_source = "hiyouga/geometry3k"
    source = datasets.Dataset.from_dict(
        {
            "problem": [
                "<image>Find x. Round to the nearest tenth.",
                "<image>Which figure has the larger area? <image>Answer A or B.",
                "What is 7 times 6?",
            ],
            "answer": ["3.5", "B", "42"],
            "images": [[png((255, 0, 0))], [png((0, 255, 0)), png((0, 0, 255), (2, 5))], []],
        },
        features=datasets.Features(
            {
                "problem": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
            }
        ),
    )

    # geo3k.py's process_fn, unchanged apart from the data source.
    def make_map_fn(split):
        def process_fn(example, idx):
            problem = example.pop("problem")
            prompt = problem + " " + INSTRUCTION
            answer = example.pop("answer")
            images = example.pop("images")
            return {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": prompt}],
                "images": images,
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": split, "index": idx, "answer": answer, "question": problem},
            }

        return process_fn

    dataset = source.map(function=make_map_fn("train"), with_indices=True)
    dataset.to_parquet(os.path.join(OUT, "verl_tiny.parquet"))
    return dataset


def gsm8k():
    data_source = "openai/gsm8k"
    source = datasets.Dataset.from_dict(
        {
            "question": ["Tom has 3 apples and buys 4 more. How many apples does he have?"],
            "answer": ["3 + 4 = 7 apples.\n#### 7"],
        }
    )

    # gsm8k.py's process_fn, unchanged apart from the instruction.
    def make_map_fn(split):
        def process_fn(example, idx):
            question_raw = example.pop("question")
            question = question_raw + " Let's think step by step."
            answer_raw = example.pop("answer")
            solution = answer_raw.split("#### ")[1].replace(",", "")
            return {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": question}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": solution},
                "extra_info": {
                    "split": split,
                    "index": idx,
                    "answer": answer_raw,
                    "question": question_raw,
                },
            }

        return process_fn

    dataset = source.map(function=make_map_fn("test"), with_indices=True)
    dataset.to_parquet(os.path.join(OUT, "verl_tiny_text.parquet"))
    return dataset


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for ds in (geo3k(), gsm8k()):
        print(ds.features)
    import pyarrow.parquet as pq

    for name in ("verl_tiny.parquet", "verl_tiny_text.parquet"):
        path = os.path.join(OUT, name)
        print(name, os.path.getsize(path), "bytes")
        print(pq.read_schema(path))
