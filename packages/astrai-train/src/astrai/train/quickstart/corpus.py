"""A small bilingual (English + Chinese) world, generated from a seed: no download.

The world is a handful of facts a tiny model can learn on a CPU in minutes: sums of small
numbers ("3 + 4 = 7." / "三加四等于七。"), weekdays in order, the colour of things, animals'
legs and sounds, counting, and number words in both languages.

- pre-training documents state the facts in running text, in both languages, with some
  web-style "Q: ... A: ..." text and digits said twice (which teaches copying from context);
- SFT conversations ask about the facts (a question, an answer in the fact's own wording);
- the sums of some number pairs are never asked about in SFT, DPO or GRPO: those questions,
  in every wording, are the held-out set. The model only read about them during
  pre-training, so accuracy on them measures whether it learnt to answer in the chat format
  and recalls what it read;
- DPO questions come with their reference reply; the preference pairs themselves are made
  later from the SFT model's own wrong replies (astrai.train.sampled_pairs);
- GRPO prompts come with the answer a reward function can check.

``write_corpus(out_dir)`` writes all of it as JSONL; ``python -m astrai.train.quickstart.corpus --out DIR``
does the same from the shell.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EN_NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
ZH_DIGITS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]


def zh_number(n: int) -> str:
    """Chinese numeral for 0..99 (十, 十一, 二十, 二十一 ...)."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
# thing (en), thing (zh), colour (en), colour (zh)
COLOURS = [
    ("the sky", "天空", "blue", "蓝色"),
    ("grass", "草", "green", "绿色"),
    ("snow", "雪", "white", "白色"),
    ("coal", "煤", "black", "黑色"),
    ("blood", "血", "red", "红色"),
    ("a banana", "香蕉", "yellow", "黄色"),
    ("an orange", "橙子", "orange", "橙色"),
    ("a leaf", "树叶", "green", "绿色"),
    ("the sea", "大海", "blue", "蓝色"),
    ("milk", "牛奶", "white", "白色"),
]
ALL_COLOURS = sorted({(c[2], c[3]) for c in COLOURS})
# animal (en), animal (zh), legs, sound (en), sound (zh)
ANIMALS = [
    ("dog", "狗", 4, "woof", "汪汪"),
    ("cat", "猫", 4, "meow", "喵喵"),
    ("cow", "牛", 4, "moo", "哞哞"),
    ("duck", "鸭子", 2, "quack", "嘎嘎"),
    ("chicken", "鸡", 2, "cluck", "咯咯"),
    ("horse", "马", 4, "neigh", "嘶嘶"),
    ("bird", "鸟", 2, "tweet", "叽叽"),
    ("sheep", "羊", 4, "baa", "咩咩"),
]
LEG_WORDS_ZH = {2: "两", 4: "四"}
MAX_OPERAND = 9  # sums and differences of 0..9


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# ---- facts as sentences ----------------------------------------------------------------


def add_en(a: int, b: int, total: int | None = None) -> str:
    return f"{a} + {b} = {a + b if total is None else total}."


def add_zh(a: int, b: int, total: int | None = None) -> str:
    return f"{zh_number(a)}加{zh_number(b)}等于{zh_number(a + b if total is None else total)}。"


def _arithmetic_sentences(rng: random.Random, lang: str) -> list[str]:
    out = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        out.append(add_en(a, b) if lang == "en" else add_zh(a, b))
    return out


def _weekday_sentences(rng: random.Random, lang: str) -> list[str]:
    start = rng.randrange(7)
    out = []
    for k in range(rng.randint(2, 5)):
        i, j = (start + k) % 7, (start + k + 1) % 7
        out.append(
            f"After {WEEKDAYS_EN[i]} comes {WEEKDAYS_EN[j]}."
            if lang == "en"
            else f"{WEEKDAYS_ZH[i]}之后是{WEEKDAYS_ZH[j]}。"
        )
    return out


def colour_sentence(item: tuple, lang: str) -> str:
    thing_en, thing_zh, colour_en, colour_zh = item
    return f"{_cap(thing_en)} is {colour_en}." if lang == "en" else f"{thing_zh}是{colour_zh}的。"


def legs_sentence(animal: tuple, lang: str) -> str:
    en, zh, legs = animal[:3]
    return f"A {en} has {EN_NUMBERS[legs]} legs." if lang == "en" else f"{zh}有{LEG_WORDS_ZH[legs]}条腿。"


def _colour_sentences(rng: random.Random, lang: str) -> list[str]:
    return [colour_sentence(item, lang) for item in rng.sample(COLOURS, rng.randint(2, 4))]


def _animal_sentences(rng: random.Random, lang: str) -> list[str]:
    out = []
    for animal in rng.sample(ANIMALS, rng.randint(2, 4)):
        en, zh, _, sound_en, sound_zh = animal
        out.append(
            legs_sentence(animal, lang)
            if rng.random() < 0.6
            else (f"The {en} says {sound_en}." if lang == "en" else f"{zh}叫{sound_zh}。")
        )
    return out


def _counting_sentences(rng: random.Random, lang: str) -> list[str]:
    start = rng.randint(0, 10)
    run = range(start, start + rng.randint(4, 8))
    if lang == "en":
        return [_cap(", ".join(EN_NUMBERS[n] for n in run)) + "."]
    return ["、".join(zh_number(n) for n in run) + "。"]


def _repeat_sentences(rng: random.Random, lang: str) -> list[str]:
    # Random digits said twice: only copying predicts the second half, which teaches the model
    # to copy from its context (what answering "What is 3 + 4?" with "3 + 4 = 7." needs).
    digits = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
    if lang == "en":
        said = " ".join(map(str, digits))
        return [f"Say {said}. {said}."]
    said = "".join(ZH_DIGITS[d] for d in digits)
    return [f"跟我说{said}。{said}。"]


def _translation_sentences(rng: random.Random, lang: str) -> list[str]:
    out = []
    for n in rng.sample(range(21), 3):
        out.append(
            f"In Chinese, {EN_NUMBERS[n]} is {zh_number(n)}."
            if lang == "en"
            else f"{zh_number(n)}的英文是 {EN_NUMBERS[n]}。"
        )
    return out


# ---- questions with checkable answers ----------------------------------------------------


@dataclass(frozen=True)
class Question:
    task: str
    lang: str
    prompt: str
    reference: str  # the expected reply, word for word
    answer: str  # the key part of the reply (for reward functions)
    operands: tuple[int, int] | None = None  # for sums

    def messages(self, reply: str | None = None) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": self.prompt}]
        return turns + ([{"role": "assistant", "content": reply}] if reply is not None else [])


ADD_PROMPTS_EN = ["What is {a} + {b}?", "How much is {a} + {b}?", "Compute {a} + {b}."]
ADD_PROMPTS_ZH = ["{a}加{b}等于几？", "{a}加{b}是多少？"]


def addition_questions(a: int, b: int) -> list[Question]:
    """The sum of a and b asked in every wording of both languages."""
    s = a + b
    return [Question("add", "en", p.format(a=a, b=b), add_en(a, b), str(s), (a, b)) for p in ADD_PROMPTS_EN] + [
        Question("add", "zh", p.format(a=zh_number(a), b=zh_number(b)), add_zh(a, b), zh_number(s), (a, b))
        for p in ADD_PROMPTS_ZH
    ]


def other_questions() -> list[Question]:
    """Weekdays, colours, legs and greetings, in both languages."""
    out = []
    for i in range(7):
        j = (i + 1) % 7
        out.append(
            Question(
                "weekday",
                "en",
                f"What day comes after {WEEKDAYS_EN[i]}?",
                f"After {WEEKDAYS_EN[i]} comes {WEEKDAYS_EN[j]}.",
                WEEKDAYS_EN[j],
            )
        )
        out.append(
            Question(
                "weekday",
                "zh",
                f"{WEEKDAYS_ZH[i]}之后是星期几？",
                f"{WEEKDAYS_ZH[i]}之后是{WEEKDAYS_ZH[j]}。",
                WEEKDAYS_ZH[j],
            )
        )
    for item in COLOURS:
        out.append(Question("colour", "en", f"What colour is {item[0]}?", colour_sentence(item, "en"), item[2]))
        out.append(Question("colour", "zh", f"{item[1]}是什么颜色的？", colour_sentence(item, "zh"), item[3]))
    for animal in ANIMALS:
        out.append(
            Question(
                "legs",
                "en",
                f"How many legs does a {animal[0]} have?",
                legs_sentence(animal, "en"),
                EN_NUMBERS[animal[2]],
            )
        )
        out.append(
            Question("legs", "zh", f"{animal[1]}有几条腿？", legs_sentence(animal, "zh"), LEG_WORDS_ZH[animal[2]])
        )
    out.append(Question("greeting", "en", "Hello!", "Hello! How can I help you?", "Hello"))
    out.append(Question("greeting", "zh", "你好！", "你好！有什么可以帮你的？", "你好"))
    return out


def split_questions(seed: int = 0, heldout_pairs: int = 20) -> tuple[list[Question], list[Question]]:
    """(train, held-out): held-out questions are the sums of ``heldout_pairs`` number pairs
    never asked about in training, in every wording of both languages (five questions a pair:
    the more questions, the less a stage's measured change is noise)."""
    rng = random.Random(seed + 1)
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rng.shuffle(pairs)
    held = [q for a, b in sorted(pairs[:heldout_pairs]) for q in addition_questions(a, b)]
    train = [q for a, b in sorted(pairs[heldout_pairs:]) for q in addition_questions(a, b)]
    return train + other_questions(), held


def split_rl(train: list[Question], seed: int = 0) -> tuple[list[Question], list[Question]]:
    """(SFT/DPO questions, GRPO-only questions): a quarter of the training sums are never
    asked in SFT or DPO, only in GRPO.

    GRPO practises those sums (pre-training read them, as it read the held-out ones), so what
    it learns there, recalling a fact read once and answering in the chat format, is what the
    held-out questions test. It practises SFT's sums too (write_corpus): on its own quarter
    alone, a 1M-parameter policy drifts towards those few sums' answers and forgets others."""
    sums = sorted({q.operands for q in train if q.operands})
    rl_pairs = set(random.Random(seed + 2).sample(sums, len(sums) // 4))
    return [q for q in train if q.operands not in rl_pairs], [q for q in train if q.operands in rl_pairs]


def _qa_sentences(questions: list[Question]) -> Callable[[random.Random, str], list[str]]:
    """Question-and-answer text (as found on the web) about the given questions only."""
    by_lang = {lang: [q for q in questions if q.lang == lang] for lang in ("en", "zh")}

    def sentences(rng: random.Random, lang: str) -> list[str]:
        picked = rng.sample(by_lang[lang], 2)
        if lang == "en":
            return [f"Q: {q.prompt} A: {q.reference}" for q in picked]
        return [f"问：{q.prompt}答：{q.reference}" for q in picked]

    return sentences


# Sums are the facts the held-out questions test, so they get the most text.
TOPICS: list[Callable[[random.Random, str], list[str]]] = [
    _arithmetic_sentences,
    _arithmetic_sentences,
    _arithmetic_sentences,
    _arithmetic_sentences,
    _weekday_sentences,
    _colour_sentences,
    _animal_sentences,
    _counting_sentences,
    _translation_sentences,
    _repeat_sentences,
]


def pretrain_documents(n_docs: int, seed: int = 0, qa: list[Question] | None = None) -> list[str]:
    """``n_docs`` short documents, about half English, half Chinese, some mixing both; with
    ``qa``, some documents also hold those questions with their answers."""
    rng = random.Random(seed)
    topics = TOPICS + ([_qa_sentences(qa)] * 2 if qa else [])
    docs = []
    for _ in range(n_docs):
        lang = rng.choice(["en", "zh"])
        sentences: list[str] = []
        for _ in range(rng.randint(1, 3)):
            topic_lang = lang if rng.random() < 0.85 else ("zh" if lang == "en" else "en")
            sentences += rng.choice(topics)(rng, topic_lang)
        # English sentences are followed by a space, Chinese ones (ending in "。") are not.
        docs.append("".join(t + (" " if t[-1] in ".?" else "") for t in sentences).rstrip())
    return docs


def is_correct(reply: str, question: Question) -> bool:
    """Exact match with the reference reply (surrounding whitespace ignored)."""
    return reply.strip() == question.reference


# ---- files ----------------------------------------------------------------------------------

_CJK_PAIR = re.compile(r"(?<=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])(?=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])")


def tokenizer_text(text: str) -> str:
    """Text for training the tokenizer, with a line break between Chinese characters.

    A byte-level BPE learns merges only inside the pieces its pre-tokenizer cuts, and it does
    not cut between Chinese characters; on a corpus this small and repetitive it would turn
    whole sentences ("三加四等于七") into single tokens, which a model cannot generalise from.
    Trained on text cut into characters (a line break, unlike a space, is not glued to the
    next character), its merges stay inside characters, so Chinese is encoded a character at
    a time. Only the tokenizer's training text is cut; the training data is not.
    """
    return _CJK_PAIR.sub("\n", text)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_corpus(
    out_dir: str | Path, seed: int = 0, n_docs: int = 4000, n_val_docs: int = 200, sft_repeats: int = 1
) -> dict[str, Path]:
    """Write every data set under ``out_dir``; returns their paths by name:

    tokenizer_text ({"text"}: documents and training questions), pretrain_train / pretrain_val
    ({"text"}), sft_train / sft_val ({"messages"}), sft_heldout (held-out questions:
    {"messages", "reference", "answer", "task", "lang", "operands"}), dpo_questions /
    dpo_heldout_questions ({"prompt", "reference"}: what astrai.train.sampled_pairs turns into
    DPO's training and validation pairs), grpo_train / grpo_val ({"prompt", "answer", "reference"}).
    """
    out = Path(out_dir)
    train_q, held_q = split_questions(seed)
    train_q, rl_q = split_rl(train_q, seed)

    def question_rows(qs: list[Question], with_reply: bool) -> list[dict]:
        return [
            {
                "messages": q.messages(q.reference if with_reply else None),
                "reference": q.reference,
                "answer": q.answer,
                "task": q.task,
                "lang": q.lang,
                "operands": q.operands,
            }
            for q in qs
        ]

    def grpo_rows(qs: list[Question]) -> list[dict]:
        return [{"prompt": q.prompt, "answer": q.answer, "reference": q.reference} for q in qs]

    def reference_rows(qs: list[Question]) -> list[dict]:
        return [{"prompt": q.prompt, "reference": q.reference} for q in qs]

    # Pre-training reads Q&A text about every question (as web text would have); SFT never
    # asks the held-out ones.
    docs = [{"text": t} for t in pretrain_documents(n_docs, seed, qa=train_q + rl_q + held_q)]
    chats = [f"user\n{q.prompt}\nassistant\n{q.reference}" for q in train_q]
    return {
        "tokenizer_text": _write(
            out / "tokenizer" / "train.jsonl", [{"text": tokenizer_text(t)} for t in [d["text"] for d in docs] + chats]
        ),
        "pretrain_train": _write(out / "pretrain" / "train.jsonl", docs),
        # A different seed stream: the validation text is new text about the same world.
        "pretrain_val": _write(
            out / "pretrain" / "val.jsonl",
            [{"text": t} for t in pretrain_documents(n_val_docs, seed + 1000, qa=train_q + rl_q + held_q)],
        ),
        "sft_train": _write(
            out / "sft" / "train.jsonl", [{"messages": q.messages(q.reference)} for q in train_q] * sft_repeats
        ),
        "sft_val": _write(out / "sft" / "val.jsonl", [{"messages": q.messages(q.reference)} for q in held_q]),
        "sft_heldout": _write(out / "sft" / "heldout.jsonl", question_rows(held_q, with_reply=False)),
        "dpo_questions": _write(
            out / "dpo" / "questions.jsonl", reference_rows([q for q in train_q if q.task != "greeting"])
        ),
        "dpo_heldout_questions": _write(out / "dpo" / "heldout_questions.jsonl", reference_rows(held_q)),
        "grpo_train": _write(out / "grpo" / "train.jsonl", grpo_rows(rl_q + [q for q in train_q if q.task == "add"])),
        "grpo_val": _write(out / "grpo" / "val.jsonl", grpo_rows(held_q)),
    }


def load_questions(path: str | Path) -> list[Question]:
    """Read back a held-out file written by ``write_corpus``."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [
        Question(
            r["task"],
            r["lang"],
            r["messages"][0]["content"],
            r["reference"],
            r["answer"],
            tuple(r["operands"]) if r.get("operands") else None,
        )
        for r in rows
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m astrai.train.quickstart.corpus",
        description="Write the bundled bilingual corpus and task data as JSONL.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=4000, help="pre-training documents")
    args = parser.parse_args(argv)
    for name, path in write_corpus(args.out, seed=args.seed, n_docs=args.docs).items():
        print(f"{name:15s} {path}")


if __name__ == "__main__":
    main()
