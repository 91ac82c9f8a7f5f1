"""Build the synthetic chat demo, demo/chat_synthetic.jsonl.xz, that `python prepare.py --demo chat`
tokenizes.

A maintainer's tool, not part of the runtime. Every conversation is made up here from small
tables: greetings, sums and differences of small numbers, capitals of countries, who wrote a
work of the ru demo's corpus, repeating a word, opposites, and a two-turn exchange in which the
model is told a name and asked for it back. Each reply follows from its question by a fixed
rule, so a small model can learn them in a few CPU minutes: the demo shows the fine-tuning
pipeline (conversations -> loss on the replies -> a model that answers in turns and stops at
the end of its turn), not a model that can hold a conversation. Some conversations open with
a system message. The output is deterministic: re-running the tool reproduces the committed
file byte for byte (tests/test_prepare.py checks that).

    python tools/make_chat_demo.py                 # rewrite demo/chat_synthetic.jsonl.xz
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "demo" / "chat_synthetic.jsonl.xz"
CONVERSATIONS = 20_000
SEED = 2024

SYSTEM = ["Ты — HomeLLM, маленький помощник. Отвечай коротко.", "Ты — вежливый ассистент.", "Отвечай по-русски и кратко."]
GREETINGS = ["Привет!", "Привет", "Здравствуй!", "Здравствуйте!", "Добрый день!", "Добрый вечер!", "Доброе утро!",
             "Привет, как дела?", "Хай!", "Приветствую!"]
GREETING_REPLY = "Здравствуйте! Я HomeLLM, маленькая языковая модель. Чем могу помочь?"
THANKS = ["Спасибо!", "Спасибо большое!", "Благодарю!", "Спасибо, ты очень помог."]
THANKS_REPLY = "Пожалуйста! Обращайтесь."
# Country in the genitive -> capital.
CAPITALS = {
    "России": "Москва", "Франции": "Париж", "Германии": "Берлин", "Италии": "Рим", "Испании": "Мадрид",
    "Японии": "Токио", "Китая": "Пекин", "Англии": "Лондон", "Польши": "Варшава", "Египта": "Каир",
    "Греции": "Афины", "Турции": "Анкара", "Канады": "Оттава", "Норвегии": "Осло", "Швеции": "Стокгольм",
    "Финляндии": "Хельсинки", "Австрии": "Вена", "Португалии": "Лиссабон", "Индии": "Нью-Дели", "Ирландии": "Дублин",
    "Чехии": "Прага", "Венгрии": "Будапешт", "Аргентины": "Буэнос-Айрес", "Мексики": "Мехико", "Кубы": "Гавана",
}
# Works in demo/ru_literature.jsonl.xz (demo/PROVENANCE.md), so the base model has read them.
AUTHORS = {
    "Евгений Онегин": "Александр Пушкин", "Капитанская дочка": "Александр Пушкин", "Дубровский": "Александр Пушкин",
    "Медный всадник": "Александр Пушкин", "Руслан и Людмила": "Александр Пушкин", "Борис Годунов": "Александр Пушкин",
    "Герой нашего времени": "Михаил Лермонтов", "Мцыри": "Михаил Лермонтов", "Бородино": "Михаил Лермонтов",
    "Шинель": "Николай Гоголь", "Ревизор": "Николай Гоголь", "Нос": "Николай Гоголь", "Вий": "Николай Гоголь",
    "Отцы и дети": "Иван Тургенев", "Муму": "Иван Тургенев", "Ася": "Иван Тургенев",
    "Белые ночи": "Фёдор Достоевский", "Бедные люди": "Фёдор Достоевский", "Записки из подполья": "Фёдор Достоевский",
    "Анна на шее": "Антон Чехов", "Каштанка": "Антон Чехов", "Хамелеон": "Антон Чехов",
    "После бала": "Лев Толстой", "Кавказский пленник": "Лев Толстой", "Смерть Ивана Ильича": "Лев Толстой",
}
OPPOSITES = {
    "большой": "маленький", "горячий": "холодный", "светлый": "тёмный", "быстрый": "медленный", "высокий": "низкий",
    "старый": "молодой", "добрый": "злой", "весёлый": "грустный", "тяжёлый": "лёгкий", "широкий": "узкий",
    "день": "ночь", "зима": "лето", "начало": "конец", "друг": "враг", "правда": "ложь", "вверх": "вниз",
    "рано": "поздно", "много": "мало", "громко": "тихо", "близко": "далеко",
}
WORDS = ["кот", "дом", "лес", "река", "солнце", "книга", "окно", "стол", "море", "гора", "птица", "дерево", "город",
         "зима", "чай", "хлеб", "луна", "звезда", "дорога", "поле", "снег", "ветер", "сад", "мост", "замок"]
NAMES = ["Анна", "Иван", "Мария", "Пётр", "Ольга", "Сергей", "Елена", "Дмитрий", "Наталья", "Алексей", "Татьяна",
         "Михаил", "Ирина", "Николай", "Светлана", "Андрей", "Юлия", "Павел", "Екатерина", "Владимир"]


def single_turn(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of a randomly chosen kind."""
    kind = rng.choice(["greeting", "thanks", "sum", "difference", "capital", "author", "repeat", "opposite"])
    if kind == "greeting":
        return rng.choice(GREETINGS), GREETING_REPLY
    if kind == "thanks":
        return rng.choice(THANKS), THANKS_REPLY
    if kind in ("sum", "difference"):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if kind == "difference":
            a, b = max(a, b), min(a, b)
        sign, value = ("+", a + b) if kind == "sum" else ("-", a - b)
        ask = rng.choice(["Сколько будет {a} {s} {b}?", "Посчитай: {a} {s} {b}", "{a} {s} {b} = ?"])
        return ask.format(a=a, s=sign, b=b), f"{a} {sign} {b} = {value}."
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        ask = rng.choice(["Какая столица {c}?", "Назови столицу {c}.", "Что является столицей {c}?"])
        return ask.format(c=country), f"Столица {country} — {CAPITALS[country]}."
    if kind == "author":
        work = rng.choice(sorted(AUTHORS))
        ask = rng.choice(["Кто написал «{w}»?", "Кто автор произведения «{w}»?", "Чьё это произведение: «{w}»?"])
        return ask.format(w=work), f"«{work}» написал {AUTHORS[work]}."
    if kind == "repeat":
        word = rng.choice(WORDS)
        ask = rng.choice(["Повтори слово: {w}", "Скажи слово «{w}».", "Напиши слово {w} ещё раз."])
        return ask.format(w=word), word
    word = rng.choice(sorted(OPPOSITES))
    ask = rng.choice(["Какое слово противоположно слову «{w}»?", "Назови антоним слова «{w}».", "Антоним к слову «{w}»?"])
    return ask.format(w=word), f"Антоним слова «{word}» — «{OPPOSITES[word]}»."


def conversation(rng: random.Random) -> list[dict]:
    """One conversation: one or two question/answer turns, or the name exchange, sometimes
    after a system message."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.3 else []
    if rng.random() < 0.15:
        name = rng.choice(NAMES)
        messages += [{"role": "user", "content": rng.choice(["Меня зовут {n}.", "Привет, я {n}.", "Моё имя — {n}."]).format(n=name)},
                     {"role": "assistant", "content": f"Приятно познакомиться, {name}!"},
                     {"role": "user", "content": rng.choice(["Как меня зовут?", "Ты помнишь, как меня зовут?", "Напомни моё имя."])},
                     {"role": "assistant", "content": f"Вас зовут {name}."}]
        return messages
    for _ in range(1 if rng.random() < 0.7 else 2):
        question, answer = single_turn(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def jsonl(count: int = CONVERSATIONS, seed: int = SEED) -> bytes:
    """The demo's JSONL text: one {"messages": [...]} per line."""
    rng = random.Random(seed)
    return "".join(json.dumps({"messages": conversation(rng)}, ensure_ascii=False) + "\n" for _ in range(count)).encode("utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUTPUT), help=f"where to write (default {OUTPUT.relative_to(REPO)})")
    args = p.parse_args(argv)
    data = jsonl()
    Path(args.out).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {args.out}: {CONVERSATIONS:,} conversations, {len(data) / 1e6:.2f} MB of JSONL")


if __name__ == "__main__":
    main()
