"""Fine-tune a bundled text backbone on a labelled text task, offline.

The backbones in `saved_models/` were pretrained by `saved_models/build_text.py`
on Wikipedia and news text shipped in the gensim wheel; the task here,
`saved_models/newsgroups/` (Usenet posts: atheism vs space), was never seen by
pretraining. The model takes raw strings: its preprocessing (a BERT-style
preprocessor, or the embedding's own tokenizer) is inside it, so training,
`predict` and the serving export tokenize alike.

    python examples/text_classifier.py [--backbone embedding|keras|bert] [--overwrite]
"""

import argparse
import pathlib

from tftransfer import build_finetuner, export_for_serving, fine_tune, predict
from tftransfer.data import from_text_directory

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAVED = ROOT / "saved_models"
BACKBONES = {
    "embedding": (SAVED / "text_embedding", {}),  # TF-Hub text embedding SavedModel
    "keras": (SAVED / "text_embedding.keras", {}),  # Keras model with TextVectorization
    "bert": (SAVED / "text_bert_encoder", {"preprocessor": str(SAVED / "text_bert_preprocess")}),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="embedding")
    parser.add_argument("--out", default=str(ROOT / "runs" / "text_classifier"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    data = from_text_directory(SAVED / "newsgroups", validation_split=0.25, seed=0,
                               batch_size=16)
    print(f"classes {data.class_names}, training texts {data.counts}")
    source, extra = BACKBONES[args.backbone]
    model = build_finetuner(str(source), num_classes=data.num_classes, learning_rate=1e-2,
                            class_names=data.class_names, **extra)
    fine_tune(model, data, head_epochs=10, fine_tune_epochs=3, output_dir=args.out,
              overwrite=args.overwrite, verbose=2)
    print("validation:", dict(zip(model.metrics_names,
                                  model.evaluate(data.validation, verbose=0))))
    for result in predict(model, ["NASA plans another shuttle launch to the space station",
                                  "Religion and the existence of God are matters of belief"]):
        print(f"{result['label']:>8}  {result['score']:.3f}  {result['text']}")
    version = export_for_serving(model, pathlib.Path(args.out) / "export", overwrite=True,
                                 version=1)
    print(f"exported to {version}: serving_default takes `texts` (string [batch])")


if __name__ == "__main__":
    main()
