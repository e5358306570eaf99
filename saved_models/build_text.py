"""Pretrains the bundled text backbones on a real corpus and writes the labelled text task.

Corpus (pretraining, unlabelled): two real English corpora that ship inside the
`gensim` wheel (`gensim/test/test_data/`, installed with `pip install gensim`):
the Wikipedia sample `enwiki-latest-pages-articles1.xml-p000000010p000030302-
shortened.bz2` (206 articles, markup stripped here) and the Lee news corpus
`lee_background.cor` (300 Australian news articles). Nothing is downloaded.

Held-apart labelled task (fine-tuning, tests, example): `mini_newsgroup` from
the same folder, 200 Usenet posts (100 `alt.atheism`, 100 `sci.space`, from the
20 Newsgroups set). Headers are dropped (they name the newsgroup) except the
`Subject:` line; pretraining never sees these posts nor their labels. They are
written as `newsgroups/<atheism|space>/NNN.txt`, the layout of
`keras.utils.text_dataset_from_directory`.

Artifacts (in `--out-dir`, default this folder):

    text_embedding/          TF-Hub-format text embedding SavedModel (tf.Module):
                             `obj(tf.string [batch]) -> float32 [batch, 64]`, the
                             mean of word vectors (PPMI + SVD on the corpus); one
                             trainable variable `embeddings` [VOCAB + 1, 64]
    text_embedding.keras     Keras 3 model: string -> TextVectorization ->
                             Embedding (same vectors) -> mean over words
    text_bert_preprocess/    BERT-style preprocessor SavedModel, plain TF ops:
                             strings -> {input_word_ids, input_mask,
                             input_type_ids} int32 [batch, 64]
    text_bert_encoder/       tiny BERT-style encoder SavedModel (2 layers, hidden
                             64, 4 heads) pretrained by masked-token prediction:
                             dict -> {pooled_output [batch, 64], sequence_output
                             [batch, 64, 64], default}; `training=` traced
    newsgroups/              the labelled task (200 `.txt` files)
    TEXT_MANIFEST.json       sizes, corpus statistics, pretraining loss, seeds

Usage:
    python saved_models/build_text.py [--out-dir DIR] [--steps 200]

Deterministic (seeded, TF op determinism); about four minutes of CPU time (the
200 masked-token steps are most of it).
"""

import argparse
import bz2
import collections
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import zlib

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

SEED = 0
VOCAB_SIZE = 6000  # words; row VOCAB_SIZE of the embedding is the unknown word
DIM = 64
WINDOW = 4
SEQ_LENGTH = 64
LAYERS, HEADS, FF = 2, 4, 128
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKEN_PATTERN = r"[^a-z0-9']+"  # what the SavedModels split on, after lowercasing


# ----------------------------------------------------------------- corpus


def gensim_data_dir():
    """`gensim/test/test_data` of the installed gensim (found without importing it)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise SystemExit("build_text.py reads its corpus from gensim's wheel: pip install gensim")
    return os.path.join(spec.submodule_search_locations[0], "test", "test_data")


def tokenize(text):
    """The SavedModels' tokenizer in Python: ASCII lowercase, split on non-word characters."""
    lowered = "".join(c.lower() if c.isascii() else c for c in text)
    return [t for t in re.split(TOKEN_PATTERN, lowered) if t]


def _strip_wiki(markup):
    text = re.sub(r"<ref[^>]*?/>|<ref.*?</ref>", " ", markup, flags=re.S)
    for _ in range(3):  # nested templates and tables
        text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>|&[a-z]+;|'{2,}|={2,}", " ", text)
    return text


def pretraining_corpus(data_dir):
    """Documents (strings) of the Wikipedia sample and the Lee news corpus."""
    path = os.path.join(data_dir, "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        xml = f.read()
    docs = [_strip_wiki(t) for t in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)]
    docs = [d for d in docs if not d.lstrip().upper().startswith("#REDIRECT")]
    with open(os.path.join(data_dir, "lee_background.cor"), encoding="latin-1") as f:
        docs += [line for line in f if line.strip()]
    return docs


class _Bunch(pickle.Unpickler):
    """Reads sklearn's old pickled `Bunch` as a dict, without sklearn's old module path."""

    def find_class(self, module, name):
        if module.startswith("sklearn"):
            return dict
        return super().find_class(module, name)


def newsgroup_posts(data_dir):
    """`[(text, label)]` of `mini_newsgroup`: Subject line and body, other headers dropped."""
    with open(os.path.join(data_dir, "mini_newsgroup"), "rb") as f:
        bunch = _Bunch(io.BytesIO(zlib.decompress(f.read())), encoding="latin1").load()
    names = [n.split(".")[-1] for n in bunch["target_names"]]  # atheism, space
    posts = []
    for raw, target in zip(bunch["data"], bunch["target"]):
        head, _, body = raw.partition("\n\n")
        subject = [line for line in head.splitlines() if line.startswith("Subject:")]
        posts.append(("\n".join(subject + [body.strip()]) + "\n", names[int(target)]))
    return posts


def build_vocabulary(docs):
    counts = collections.Counter(t for d in docs for t in tokenize(d))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:VOCAB_SIZE]]


# ----------------------------------------------------------------- embedding


def ppmi_svd_vectors(docs, vocab):
    """Word vectors: SVD of the positive PMI matrix (window 4, context smoothing 0.75)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import svds

    index = {w: i for i, w in enumerate(vocab)}
    rows, cols = [], []
    for doc in docs:
        ids = [index[t] for t in tokenize(doc) if t in index]
        for offset in range(1, WINDOW + 1):
            rows += ids[:-offset] + ids[offset:]
            cols += ids[offset:] + ids[:-offset]
    n = len(vocab)
    counts = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    word = np.asarray(counts.sum(1)).ravel()
    context = np.asarray(counts.sum(0)).ravel() ** 0.75
    coo = counts.tocoo()
    pmi = np.log(coo.data * context.sum() / (word[coo.row] * context[coo.col]))
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n)).tocsr()
    u, s, _ = svds(ppmi, k=DIM, v0=np.full(n, 1 / np.sqrt(n)))
    vectors = u[:, ::-1] * np.sqrt(s[::-1])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8
    return vectors.astype("float32")


class TextEmbedding(tf.Module):
    """TF-Hub text embedding: strings -> mean of the known words' vectors."""

    def __init__(self, vocab, vectors):
        super().__init__()
        keys = tf.constant(vocab)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(vocab), dtype=tf.int64)),
            default_value=len(vocab))
        unknown = np.zeros((1, vectors.shape[1]), "float32")
        self.embeddings = tf.Variable(np.concatenate([vectors, unknown]), name="embeddings")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, sentences):
        words = tf.strings.split(tf.strings.regex_replace(
            tf.strings.lower(sentences), TOKEN_PATTERN, " "))
        ids = self.table.lookup(words)
        known = tf.cast(ids < self.table.size(), tf.float32)
        vectors = tf.gather(self.embeddings, ids) * tf.expand_dims(known, -1)
        total = tf.reduce_sum(vectors, axis=1)
        return total / tf.maximum(tf.reduce_sum(known, axis=1, keepdims=True), 1.0)


def save_keras_embedding(vocab, vectors, path):
    import keras

    inputs = keras.Input(shape=(), dtype="string", name="text")
    vectorize = keras.layers.TextVectorization(
        max_tokens=len(vocab) + 2, standardize="lower_and_strip_punctuation",
        output_sequence_length=SEQ_LENGTH, vocabulary=vocab, name="vectorize")
    padded = np.concatenate([np.zeros((2, DIM), "float32"), vectors])  # "" and "[UNK]" rows
    embed = keras.layers.Embedding(len(vocab) + 2, DIM, mask_zero=True, name="embedding")
    x = embed(vectorize(inputs))
    outputs = keras.layers.GlobalAveragePooling1D(name="features")(x)
    model = keras.Model(inputs, outputs, name="text_embedding")
    embed.set_weights([padded])
    model.save(path)


# ----------------------------------------------------------------- BERT-style pair


class Preprocessor(tf.Module):
    """strings -> BERT inputs: [CLS] words [SEP], padded to SEQ_LENGTH (plain TF ops)."""

    def __init__(self, vocab):
        super().__init__()
        tokens = list(SPECIALS) + list(vocab)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(tokens),
                                                tf.range(len(tokens), dtype=tf.int64)),
            default_value=SPECIALS.index("[UNK]"))
        self.vocab_size = tf.constant(len(tokens))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, sentences):
        words = tf.strings.split(tf.strings.regex_replace(
            tf.strings.lower(sentences), TOKEN_PATTERN, " "))
        ids = tf.cast(self.table.lookup(words), tf.int32)[:, :SEQ_LENGTH - 2]
        batch = tf.shape(sentences)[:1]
        cls = tf.fill(tf.concat([batch, [1]], 0), SPECIALS.index("[CLS]"))
        sep = tf.fill(tf.concat([batch, [1]], 0), SPECIALS.index("[SEP]"))
        ids = tf.concat([cls, ids, sep], axis=1)
        word_ids = ids.to_tensor(0, shape=[None, SEQ_LENGTH])
        mask = tf.ones_like(ids).to_tensor(0, shape=[None, SEQ_LENGTH])
        return {"input_word_ids": word_ids, "input_mask": mask,
                "input_type_ids": tf.zeros_like(word_ids)}


def _dense(rng, n_in, n_out, name):
    w = tf.Variable(rng.normal(0, 0.02, (n_in, n_out)).astype("float32"), name=f"{name}/kernel")
    b = tf.Variable(np.zeros(n_out, "float32"), name=f"{name}/bias")
    return w, b


def _norm(name):
    return (tf.Variable(np.ones(DIM, "float32"), name=f"{name}/gamma"),
            tf.Variable(np.zeros(DIM, "float32"), name=f"{name}/beta"))


def _layer_norm(x, params):
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-6) * params[0] + params[1]


class Encoder(tf.Module):
    """Tiny BERT-style encoder: post-norm transformer blocks; pooled = masked mean."""

    def __init__(self, vocab_size, seed=SEED):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.word = tf.Variable(rng.normal(0, 0.02, (vocab_size, DIM)).astype("float32"),
                                name="embeddings/word")
        self.position = tf.Variable(rng.normal(0, 0.02, (SEQ_LENGTH, DIM)).astype("float32"),
                                    name="embeddings/position")
        self.type = tf.Variable(rng.normal(0, 0.02, (2, DIM)).astype("float32"),
                                name="embeddings/type")
        self.embed_norm = _norm("embeddings/norm")
        self.blocks = [self._block(rng, i) for i in range(LAYERS)]

    @staticmethod
    def _block(rng, i):
        return {"qkv": _dense(rng, DIM, 3 * DIM, f"layer{i}/qkv"),
                "out": _dense(rng, DIM, DIM, f"layer{i}/attention_output"),
                "norm1": _norm(f"layer{i}/attention_norm"),
                "ff1": _dense(rng, DIM, FF, f"layer{i}/intermediate"),
                "ff2": _dense(rng, FF, DIM, f"layer{i}/output"),
                "norm2": _norm(f"layer{i}/output_norm")}

    def _attention(self, x, mask, block, training):
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        qkv = tf.matmul(x, block["qkv"][0]) + block["qkv"][1]
        qkv = tf.transpose(tf.reshape(qkv, [batch, length, 3, HEADS, DIM // HEADS]), [2, 0, 3, 1, 4])
        scores = tf.matmul(qkv[0], qkv[1], transpose_b=True) / np.sqrt(DIM // HEADS)
        scores += (1.0 - tf.cast(mask[:, None, None, :], tf.float32)) * -1e9
        context = tf.matmul(tf.nn.softmax(scores), qkv[2])
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [batch, length, DIM])
        out = tf.matmul(context, block["out"][0]) + block["out"][1]
        return tf.nn.dropout(out, 0.1, seed=SEED) if training else out

    def encode(self, inputs, training):
        ids, mask = inputs["input_word_ids"], inputs["input_mask"]
        length = tf.shape(ids)[1]
        x = (tf.gather(self.word, ids) + self.position[None, :length]
             + tf.gather(self.type, inputs["input_type_ids"]))
        x = _layer_norm(x, self.embed_norm)
        for block in self.blocks:
            x = _layer_norm(x + self._attention(x, mask, block, training), block["norm1"])
            hidden = tf.nn.gelu(tf.matmul(x, block["ff1"][0]) + block["ff1"][1])
            x = _layer_norm(x + tf.matmul(hidden, block["ff2"][0]) + block["ff2"][1],
                            block["norm2"])
        weights = tf.cast(mask, tf.float32)[:, :, None]
        pooled = tf.reduce_sum(x * weights, 1) / tf.maximum(tf.reduce_sum(weights, 1), 1.0)
        return {"sequence_output": x, "pooled_output": pooled, "default": pooled}

    @tf.function
    def __call__(self, inputs, training=False):
        return self.encode(inputs, training)


def _mlm_batches(docs, preprocess, rng, batch_size):
    """Masked-token batches from SEQ_LENGTH-2-word windows of the corpus."""
    words = [w for d in docs for w in tokenize(d)]
    step = SEQ_LENGTH - 2
    windows = [" ".join(words[i:i + step]) for i in range(0, len(words) - step, step)]
    encoded = preprocess(tf.constant(windows))
    ids = encoded["input_word_ids"].numpy()
    while True:
        pick = rng.choice(len(ids), batch_size, replace=False)
        batch = ids[pick]
        special = batch < len(SPECIALS)
        chosen = (rng.random(batch.shape) < 0.15) & ~special
        masked = np.where(chosen, SPECIALS.index("[MASK]"), batch)
        yield ({"input_word_ids": masked, "input_mask": np.ones_like(batch),
                "input_type_ids": np.zeros_like(batch)}, batch, chosen)


def pretrain_encoder(encoder, docs, preprocess, steps, batch_size=32):
    """Masked-token prediction with the word embeddings tied to the output; returns losses."""
    import keras

    rng = np.random.default_rng(SEED)
    bias = tf.Variable(np.zeros(encoder.word.shape[0], "float32"))
    optimizer = keras.optimizers.Adam(1e-3)
    variables = list(encoder.trainable_variables) + [bias]

    @tf.function
    def train_step(inputs, targets, chosen):
        with tf.GradientTape() as tape:
            hidden = encoder.encode(inputs, training=True)["sequence_output"]
            logits = tf.matmul(hidden, encoder.word, transpose_b=True) + bias
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
            weights = tf.cast(chosen, tf.float32)
            loss = tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    losses = []
    batches = _mlm_batches(docs, preprocess, rng, batch_size)
    for step in range(steps):
        inputs, targets, chosen = next(batches)
        losses.append(float(train_step(inputs, targets, chosen)))
        if step % 100 == 0:
            print(f"  mlm step {step}: loss {np.mean(losses[-100:]):.3f}", flush=True)
    return losses


def save_encoder(encoder, path):
    spec = {k: tf.TensorSpec([None, SEQ_LENGTH], tf.int32)
            for k in ("input_word_ids", "input_mask", "input_type_ids")}
    for training in (False, True):
        encoder.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(encoder, path)


# ----------------------------------------------------------------- main


def write_newsgroups(posts, root):
    shutil.rmtree(root, ignore_errors=True)
    numbers = collections.Counter()
    for text, label in posts:
        os.makedirs(os.path.join(root, label), exist_ok=True)
        with open(os.path.join(root, label, f"{numbers[label]:03d}.txt"), "w",
                  encoding="utf-8") as f:
            f.write(text)
        numbers[label] += 1
    return dict(numbers)


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--steps", type=int, default=200, help="masked-token pretraining steps")
    args = parser.parse_args(argv)
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    data_dir = gensim_data_dir()
    docs = pretraining_corpus(data_dir)
    vocab = build_vocabulary(docs)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    print(f"corpus: {len(docs)} documents, {sum(len(tokenize(d)) for d in docs)} words")

    vectors = ppmi_svd_vectors(docs, vocab)
    for name in ("text_embedding", "text_bert_preprocess", "text_bert_encoder"):
        shutil.rmtree(out(name), ignore_errors=True)
    tf.saved_model.save(TextEmbedding(vocab, vectors), out("text_embedding"))
    save_keras_embedding(vocab, vectors, out("text_embedding.keras"))

    preprocess = Preprocessor(vocab)
    tf.saved_model.save(preprocess, out("text_bert_preprocess"))
    encoder = Encoder(len(SPECIALS) + len(vocab))
    losses = pretrain_encoder(encoder, docs, preprocess, args.steps)
    save_encoder(encoder, out("text_bert_encoder"))

    counts = write_newsgroups(newsgroup_posts(data_dir), out("newsgroups"))
    names = ("text_embedding", "text_embedding.keras", "text_bert_preprocess",
             "text_bert_encoder", "newsgroups")
    manifest = {
        "corpus": {"source": "gensim wheel, gensim/test/test_data: Wikipedia sample "
                             "(enwiki ... shortened.bz2) + lee_background.cor",
                   "documents": len(docs), "vocabulary": len(vocab)},
        "embedding": {"method": "PPMI (window 4, alpha 0.75) + truncated SVD", "dim": DIM},
        "encoder": {"layers": LAYERS, "hidden": DIM, "heads": HEADS, "intermediate": FF,
                    "seq_length": SEQ_LENGTH, "objective": "masked-token prediction",
                    "steps": args.steps, "loss_first_100": round(float(np.mean(losses[:100])), 3),
                    "loss_last_100": round(float(np.mean(losses[-100:])), 3)},
        "task": {"source": "gensim wheel, mini_newsgroup (20 Newsgroups)", "counts": counts},
        "seed": SEED, "tensorflow": tf.__version__,
        "sizes": {name: _size(out(name)) for name in names},
    }
    with open(out("TEXT_MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
