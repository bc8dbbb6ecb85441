"""A seeded synthetic 4-class dataset of customer-support messages, for demos and smoke tests.

Sentences are templates x slot fillers with shared openers, endings, products and order
numbers across classes, plus occasional lowercase and typos, so a model must read the
request itself rather than match one fixed keyword.
"""

from __future__ import annotations

import random

CLASSES = ("billing", "shipping", "technical", "account")

_OPENERS = ["", "", "", "Hi,", "Hello,", "Hey there,", "Good morning,", "Good afternoon,", "Hi team,",
            "Dear support,", "Quick question:", "Hello again,", "Hi, it's me again.", "Urgent:",
            "Sorry to bother you.", "Hope you're well."]
_ENDINGS = ["", "", "", "Thanks!", "Thank you.", "Any help is appreciated.", "Please advise.",
            "Thanks in advance.", "Cheers.", "Appreciate it.", "Let me know what you need from me.",
            "This is getting frustrating.", "Please get back to me soon.", "Kind regards."]
_PRODUCTS = ["the wireless headphones", "my standing desk", "the coffee grinder", "the 4K monitor",
             "the running shoes", "my phone case", "the air purifier", "the smart thermostat",
             "the laptop stand", "the yoga mat", "the blender", "the backpack", "the e-reader",
             "the webcam", "the electric kettle", "the gaming chair", "the robot vacuum",
             "the fitness tracker", "the bluetooth speaker", "the mechanical keyboard"]
_GADGETS = ["the wireless headphones", "the 4K monitor", "the air purifier", "the smart thermostat",
            "the e-reader", "the webcam", "the robot vacuum", "the fitness tracker",
            "the bluetooth speaker", "the mechanical keyboard", "the smart doorbell", "the router"]
_PAST = ["yesterday", "last Tuesday", "two weeks ago", "earlier today", "over the weekend",
         "last month", "this morning", "a few days ago", "on Monday", "three days ago"]
_SINCE = ["yesterday", "last Tuesday", "Monday", "the weekend", "last month", "this morning",
          "the last update", "early last week"]
_DEADLINES = ["Friday", "the weekend", "the end of the month", "Christmas", "my birthday"]
_FUTURE = ["next week", "on Friday", "at the end of the month", "tomorrow", "in two weeks"]
_PLACES = ["Canada", "my office", "Berlin", "my parents' house", "Austin", "the UK", "Melbourne",
           "a pickup point", "my new apartment", "Toronto"]
_DEVICES = ["iPhone", "Android phone", "Windows laptop", "MacBook", "iPad", "Chromebook"]
_NAMES = ["anna", "ben", "carlos", "dana", "eli", "fatima", "george", "hana", "ivan", "julia"]
_DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "proton.me", "example.org"]

_TEMPLATES = {
    "billing": [
        "I was charged {amount} twice for {product} {past}.",
        "Why does my invoice show {amount} when {product} was listed at {amount2}?",
        "Can I get a refund for {product}? The {amount} charge went through {past}.",
        "My card was billed {amount} {past} even though I cancelled the subscription.",
        "The promo code didn't apply, so I paid {amount} for {product} instead of the sale price.",
        "I need a copy of the receipt for order {order}; the total was {amount}.",
        "There's a {amount} fee on my statement that I don't recognize.",
        "Could you switch my payment method to PayPal before the next billing cycle?",
        "Is there a way to split the {amount} payment for {product} into installments?",
        "I was promised {amount} back {past} and the refund still hasn't shown up.",
        "You took {amount} from my account for order {order} but the price was {amount2}.",
        "Please explain the extra {amount} tax added to my last bill.",
    ],
    "shipping": [
        "My order {order} with {product} still hasn't arrived; it was due {past}.",
        "The tracking number for {product} hasn't updated since {since}.",
        "Can I change the delivery address for order {order}? I'm moving {future}.",
        "{product} arrived in a crushed box with a dented corner.",
        "The courier left {product} at the wrong door {past}.",
        "How long does express delivery to {place} usually take?",
        "I received someone else's package instead of {product}.",
        "Is it possible to send order {order} to {place} instead?",
        "The package says delivered {past} but nothing is here.",
        "Only half of order {order} showed up; {product} is missing.",
        "Will {product} get to {place} before {deadline} if I pay for faster shipping?",
        "The parcel with {product} has been stuck at customs since {since}.",
    ],
    "technical": [
        "{product} stopped connecting to Bluetooth {past}.",
        "The app keeps crashing whenever I try to pair {product} with my {device}.",
        "After the latest firmware update, {product} won't turn on.",
        "{product} makes a loud buzzing noise after about {minutes} minutes of use.",
        "I get error code {code} when setting up {product}.",
        "The battery in {product} now drains in under {hours} hours.",
        "The touch controls on {product} have been unresponsive since {since}.",
        "How do I reset {product} to factory settings? Nothing I try works.",
        "{product} overheats and shuts itself off every {minutes} minutes.",
        "The companion app won't sync with {product} on my {device}.",
        "{product} keeps dropping the wifi connection since {since}.",
        "The screen on {product} flickers and then goes black.",
    ],
    "account": [
        "I can't log in; the password reset email never arrives.",
        "Please update the email on my account to {email}.",
        "How do I delete my account and all of my data?",
        "My account was locked after too many login attempts {past}.",
        "Someone changed my password {past} and it wasn't me.",
        "I'd like to merge my two accounts; the other one uses {email}.",
        "The two-factor code isn't being sent to my phone ending in {digits}.",
        "Can you change the username on my profile to {username}?",
        "I signed up with {email} but never got the verification link.",
        "How do I turn off the marketing emails in my account settings?",
        "I want to add my partner as a second user on the account I used to buy {product}.",
        "My login with {email} says the account doesn't exist, but I ordered {product} {past}.",
    ],
}


def _slots(rng: random.Random) -> dict[str, str]:
    name = rng.choice(_NAMES)
    return {
        "amount": f"${rng.randint(5, 400)}.{rng.choice(['00', '99', '49', '95', '50'])}",
        "amount2": f"${rng.randint(5, 400)}.{rng.choice(['00', '99', '49'])}",
        "product": rng.choice(_PRODUCTS),
        "order": f"#{rng.randint(10000, 99999)}",
        "past": rng.choice(_PAST),
        "since": rng.choice(_SINCE),
        "future": rng.choice(_FUTURE),
        "deadline": rng.choice(_DEADLINES),
        "place": rng.choice(_PLACES),
        "device": rng.choice(_DEVICES),
        "minutes": str(rng.choice([5, 10, 15, 20, 30, 45])),
        "hours": str(rng.choice([2, 3, 4, 6, 8])),
        "code": f"E{rng.randint(100, 999)}",
        "email": f"{name}.{rng.choice(_NAMES)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}",
        "digits": f"{rng.randint(0, 9999):04d}",
        "username": f"{name}_{rng.randint(1, 999)}",
    }


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    j = rng.randrange(len(words[i]) - 1)
    w = words[i]
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # swap two adjacent letters
    return " ".join(words)


def _sentence(rng: random.Random, label: str) -> str:
    slots = _slots(rng)
    if label == "technical":
        slots["product"] = rng.choice(_GADGETS)
    body = rng.choice(_TEMPLATES[label]).format(**slots)
    opener = rng.choice(_OPENERS)
    # "Hi, the parcel ..." but "Hi, I was ..." and "Urgent: The parcel ...".
    lower = opener.endswith(",") and not (body.startswith("I ") or body.startswith("I'"))
    body = (body[0].lower() if lower else body[0].upper()) + body[1:]
    text = " ".join(p for p in (opener, body, rng.choice(_ENDINGS)) if p)
    if rng.random() < 0.15:
        text = _typo(rng, text)
    if rng.random() < 0.1:
        text = text.lower()
    if rng.random() < 0.1:
        text = text.rstrip(".!")
    return text


def generate_demo_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct ``{"text", "label"}`` rows, class-balanced (counts differ by at most 1)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    labels = [CLASSES[i % len(CLASSES)] for i in range(n)]
    rng.shuffle(labels)
    seen: set[str] = set()
    rows = []
    for label in labels:
        for _ in range(1000):  # the slot space is huge; a repeat is rare
            text = _sentence(rng, label)
            if text not in seen:
                break
        else:
            raise ValueError(f"cannot make {n} distinct demo sentences")
        seen.add(text)
        rows.append({"text": text, "label": label})
    return rows


DEMO_INSTRUCTION = ("Which team should handle this customer message: account, billing, shipping or technical? "
                    "Answer with one word.\nMessage: {text}")


def demo_instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """The demo rows as instructions for a causal LM: the message in a fixed question, the team as
    the one-word response (``data.builtin = "demo-instructions"``)."""
    return [{"prompt": DEMO_INSTRUCTION.format(text=r["text"]), "response": r["label"]}
            for r in generate_demo_rows(n, seed)]
