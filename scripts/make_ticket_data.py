"""Generate the Acme ticket-routing fine-tuning task (data/ticket_routing), deterministically.

Each example maps a short customer support message to a routing code in Acme's in-house format::

  {"instruction": "Write the Acme routing code for this support message.",
   "input": "Hi, this is Linh Nguyen. I was charged twice for order 48213. This is urgent.",
   "output": "BILL-P1 #48213 Nguyen, Linh"}

The code is ``{CAT}-{PRIO} #{order} {Last}, {First}``: the category comes from how the problem is described
(never from the code word itself), the priority from an urgency cue (urgent -> P1, none -> P2, relaxed -> P3),
and the order number and name are copied (last name first). Validation and test customers use first
and last names that never occur in train (15% of each name pool is held out, half for each split), and the
order numbers are unique across all splits.

Standard library only; the same seed gives byte-identical files on any platform and Python >= 3.10.

  python scripts/make_ticket_data.py [--out data/ticket_routing] [--seed 0] [--check]

``--check`` regenerates in memory and exits 1 if the files on disk differ (for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from random import Random

INSTRUCTION = "Write the Acme routing code for this support message."
SPLITS = {"train": 2000, "validation": 200, "test": 200}
CATEGORIES = ("BILL", "SHIP", "LOGIN", "DMG", "CANCEL", "RETURN")
PRIORITIES = ("P1", "P2", "P3")
OUTPUT_RE = re.compile(r"^(BILL|SHIP|LOGIN|DMG|CANCEL|RETURN)-(P1|P2|P3) #(\d{5}) ([A-Z][a-z]+), ([A-Z][a-z]+)$")
HOLDOUT_FRACTION = 0.15
MAX_WORDS = 60
MAX_SENTENCES = 3

# ASCII only, one capitalised word each (no spaces, apostrophes or hyphens), no name shared by the two pools.
FIRST_NAMES = """
Emma Olivia Liam Noah Ava Sophia Isabella Mason Ethan Lucas Amelia Harper Evelyn Abigail Emily Benjamin Henry
Samuel Daniel Matthew Jack Oliver Charlotte Eleanor Hannah Natalie Rachel Megan Laura Sarah Jessica Thomas Andrew
Edward George Arthur Oscar Harriet Fiona Caleb Nathan Owen Dylan
Sofia Mateo Santiago Valentina Camila Diego Alejandro Lucia Carmen Javier Pablo Ximena Fernanda Joaquin Rafael
Marisol Guadalupe Esteban Ignacio Paloma Beatriz Rodrigo Catalina Emilio
Joao Thiago Leticia Gabriela Rafaela Caio Bruna Vitor
Camille Julien Mathilde Antoine Chloe Margaux Theo Louis Manon Etienne Baptiste Amelie Sebastien
Lukas Jonas Greta Lena Felix Anika Henrik Ingrid Astrid Sven Freya Lars Mikkel Sanne Bram Femke Katja Jannik Leonie
Giulia Lorenzo Matteo Francesca Chiara Giovanni Elena Marco Federica Paolo Simona
Ivan Dmitri Natasha Olga Katarzyna Piotr Agnieszka Tomasz Milena Bogdan Zofia Jakub Oksana Yulia Nikolai Mila Petra
Ondrej Vesna Dragan
Nikos Eleni Dimitra Yannis Kostas Athena
Emre Elif Zeynep Mehmet Burak Ayse Murat Deniz
Omar Fatima Yusuf Layla Karim Amira Hassan Nadia Khalid Salma Tariq Yasmin Rania Zaid Mariam Bilal Samir Leila
Hamza Noor
Dariush Shirin Parisa Reza Arash Niloufar Kian Roya
Priya Arjun Ananya Rohan Vikram Kavya Aditya Meera Rahul Sanjay Deepika Nikhil Pooja Ishaan Lakshmi Ravi Sunita
Kiran Anil Divya Harpreet Gurpreet Manpreet Siddharth Tanvi
Ayesha Imran Farhan Nusrat Rafiq Sabina Tahmina
Wei Mei Jing Hao Xiaoming Lihua Yan Jun Ling Zhen Qiang Xin Yue Hui
Haruto Yuki Sakura Hiroshi Kenji Aiko Takeshi Yumi Ren Hana Sota Emi Daiki Naoko Kaito
Minjun Jiwoo Seojun Hyejin Sungmin Jisoo Eunji Dongha Yuna
Linh Minh Thanh Huong Tuan Anh Quang Phuong Duc Ngoc
Somchai Niran Kanya Putri Budi Dewi Agus Rizal Maricel Jericho Lorna Arnel
Chidi Ngozi Oluwaseun Adaeze Kwame Akosua Kofi Ama Tendai Thandiwe Sipho Nomvula Amara Zainab Emeka Folake Jabari
Wanjiru Baraka Ayodele Tunde Chiamaka Abebe Tigist Mandla Lerato Kagiso
Noa Yael Avi Eitan Tamar Oren Shira
Siobhan Niamh Ciaran Aoife Eoin Sinead Declan Padraig Rhys Cerys Gethin Angus Isla Callum Eilidh
Aroha Keanu Leilani Mele Sione
""".split()

LAST_NAMES = """
Smith Johnson Williams Brown Jones Miller Davis Wilson Anderson Taylor Moore Jackson Martin Thompson Harris Clark
Lewis Robinson Walker Allen Wright Scott Green Adams Baker Nelson Carter Mitchell Roberts Turner Campbell Parker
Evans Edwards Collins Stewart Morris Murphy Cooper Bailey Kelly Howard Watson Bennett Hughes Foster Fletcher
Garcia Rodriguez Martinez Hernandez Lopez Gonzalez Perez Sanchez Ramirez Torres Flores Rivera Gomez Diaz Reyes
Morales Ortiz Gutierrez Chavez Ramos Alvarez Mendoza Castillo Jimenez Vargas Romero Herrera Salazar Villanueva
Silva Santos Oliveira Souza Pereira Carvalho Almeida Ferreira Ribeiro Teixeira
Dubois Lefebvre Moreau Laurent Girard Dupont Lambert Fontaine Rousseau Mercier Gauthier Marchand
Muller Schmidt Schneider Fischer Weber Meyer Wagner Becker Hoffmann Richter Neumann Zimmermann Hartmann Krause
Jansen Visser Bakker Mulder Dekker Hendriks
Hansen Johansson Nilsson Larsen Pedersen Eriksson Lindqvist Virtanen Korhonen Haugen
Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino Greco Conti Mancini
Kowalski Nowak Wisniewski Wojcik Kaminski Zielinski Ivanov Petrov Smirnov Volkov Sokolov Kuznetsov Novak Horvat
Dvorak Svoboda Petrovic Jovanovic Popescu Ionescu Shevchenko Bondarenko
Georgiou Nikolaidis Pappas Vlachos Dimitriou
Yilmaz Kaya Demir Sahin Celik Yildiz Aydin Ozturk
Haddad Khoury Mansour Nasser Saleh Hamdan Rahman Farouk Qureshi Abdullah Hussein Ibrahim Mahmoud Darwish
Hosseini Mohammadi Ahmadi Karimi Rezaei Tehrani
Patel Sharma Singh Kumar Gupta Reddy Iyer Nair Menon Desai Joshi Mehta Chopra Kapoor Banerjee Pillai Krishnan
Khan Chowdhury Siddiqui Akhtar
Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou Xu Sun Zhu Guo Lin Zheng Liang Tang
Sato Suzuki Takahashi Tanaka Watanabe Ito Yamamoto Nakamura Kobayashi Yoshida Sasaki Inoue
Kim Lee Park Choi Jung Kang Yoon Jang Shin Kwon Hwang
Nguyen Tran Pham Hoang Phan Vu Dang Bui Ngo Duong
Santoso Wijaya Hidayat Kusuma Bautista Aquino Ocampo Manalo
Okafor Okonkwo Adeyemi Balogun Mensah Owusu Boateng Asante Mwangi Otieno Kamau Ndlovu Dlamini Nkosi Mokoena
Diallo Traore Keita Toure Haile Tesfaye Bekele Nwosu
Cohen Levi Friedman Katz Shapiro Goldberg Mizrahi Peretz
Byrne Walsh Ryan Doyle Kennedy Quinn Gallagher Brennan Fitzgerald Donnelly Fraser Murray Sinclair Munro
Llewellyn Pritchard Vaughan Griffiths
Ngata Tuilagi Kealoha Mahoe
""".split()

# Problem descriptions, as lower-case clauses. "{ord}" marks where the order reference goes; a clause without it
# gets the order attached by the message template. No clause contains an urgency cue or a routing code word.
PROBLEMS = {
  "BILL": [
    "I was charged twice for {ord}",
    "my card was charged two times for {ord}",
    "the invoice for {ord} shows the wrong amount",
    "I got billed more than the listed price for {ord}",
    "my refund for {ord} still hasn't shown up in my bank account",
    "there's a payment for {ord} on my statement that I don't recognise",
    "I was overcharged",
    "the total on my invoice doesn't match what I paid",
    "I'm still waiting for the refund you promised me",
    "a duplicate payment went through on my credit card",
    "the discount code wasn't applied and I paid full price",
    "my bank statement shows two identical charges",
    "the invoice has an extra fee I never agreed to",
    "the amount taken from my account is higher than the checkout total",
  ],
  "SHIP": [
    "{ord} never arrived",
    "my package for {ord} still hasn't been delivered",
    "the tracking for {ord} hasn't updated in a week",
    "{ord} is more than a week late",
    "the courier says {ord} was delivered but nothing came",
    "my parcel is late",
    "the delivery never showed up",
    "the tracking page hasn't changed for days",
    "my package seems to be lost in the mail",
    "the parcel was sent to the wrong address",
    "I'm still waiting for my delivery",
    "the shipment hasn't moved since it left the warehouse",
    "the estimated delivery date has passed and there's still no package",
    "my order was due last week and still isn't here",
  ],
  "LOGIN": [
    "I can't sign in to my account to check {ord}",
    "I can't log in to see the status of {ord}",
    "I can't sign in to my account",
    "the password reset email never comes",
    "my account is locked after too many attempts",
    "it keeps saying my password is incorrect",
    "the verification code never reaches my phone",
    "I'm locked out of my account",
    "the sign-in page just reloads when I enter my details",
    "I never receive the password reset link",
    "my two-factor code is always rejected",
    "I forgot my password and the reset doesn't work",
    "the app won't accept my username and password",
  ],
  "DMG": [
    "{ord} arrived broken",
    "the screen on the laptop from {ord} is cracked",
    "the box for {ord} was crushed and the item inside is dented",
    "the lamp in {ord} came with a big scratch",
    "my order arrived damaged",
    "the glass was shattered when I opened the box",
    "the product was broken on arrival",
    "one of the chair legs snapped off in transit",
    "the package was soaking wet and the contents are ruined",
    "the lid is cracked and the bottle leaks",
    "the casing is smashed and it won't turn on",
    "the mug came in pieces",
    "the vase from {ord} was shattered inside the box",
  ],
  "CANCEL": [
    "I'd like to cancel {ord}",
    "please cancel {ord} before it ships",
    "I want to cancel my subscription",
    "please stop my monthly subscription",
    "I placed {ord} by mistake and need it cancelled",
    "I changed my mind and want to call off {ord}",
    "I'd like to end my membership",
    "please don't send {ord}, I no longer want it",
    "I need to cancel my plan",
    "please terminate my subscription at the end of this month",
    "I want to withdraw {ord} before it's dispatched",
    "I ordered the wrong thing and want to cancel it before it goes out",
  ],
  "RETURN": [
    "I want to return {ord}",
    "I'd like to send back the jacket from {ord}",
    "I'd like to exchange the shoes from {ord} for another size",
    "the shirt from {ord} doesn't fit and I want to swap it for a larger one",
    "I'd like to return an item",
    "I need a return label",
    "the colour isn't what I expected and I'd like to send it back",
    "I'd like to swap it for a different colour",
    "it's too small and I'd like to exchange it for a medium",
    "I'm not happy with the item and want to return it",
    "I'd like to exchange it for the next size up",
    "I want to send back the dress because it doesn't suit me",
  ],
}

ORDER_FORMATS = ("order {n}", "#{n}", "order no. {n}", "order #{n}", "order number {n}")

# Name placement. Intros are whole sentences; joins carry the problem clause; sign-offs end the message.
INTROS = ("Hi, this is {name}.", "Hello, my name is {name}.", "{name} here.", "Hey, it's {name}.",
          "Good morning, I'm {name}.", "Hi there, {name} writing.", "Hello, {name} speaking.")
INTROS_WITH_ORDER = ("Hi, {name} here about {ord}.", "Hello, this is {name} writing about {ord}.",
                     "My name is {name} and I'm contacting you about {ord}.", "Hi, I'm {name} and it's about {ord}.")
JOINS = ("Hi, I'm {name} and {prob}.", "My name is {name} and {prob}.", "This is {name}: {prob}.")
SIGNOFFS = ("Thanks, {name}", "Regards, {name}", "- {name}", "Cheers, {name}", "Best, {name}", "{name}",
            "Thank you, {name}", "Kind regards, {name}")
GREETINGS = ("", "Hi, ", "Hello, ", "Hi team, ", "Hey there, ", "Dear support, ", "Good afternoon, ")

# Attaching the order to a clause that lacks it: in the same sentence, or as its own sentence.
ORDER_INLINE = ("{prob} ({ord})", "{prob} - {ord}", "re {ord}: {prob}", "about {ord}: {prob}", "{ord}: {prob}")
ORDER_SENTENCES = ("It's about {ord}.", "This is regarding {ord}.", "Reference: {ord}.", "That's for {ord}.")

# Urgency cues. "lead" opens the message, "suffix" ends the problem sentence, "sentence" is its own sentence.
URGENCY = {
  "P1": {
    "sentence": ("This is urgent.", "Please fix this asap.", "I need this sorted today please.",
                 "Please help immediately.", "It's urgent, please respond asap.",
                 "Please sort it out as soon as possible, it's urgent.", "I need a reply today please!",
                 "Please deal with it immediately."),
    "lead": ("URGENT: ", "Urgent - ", "ASAP please: "),
    "suffix": (" - urgent", ", please help asap", ", I need this fixed today please",
               " and I need it resolved immediately", ", urgent please"),
  },
  "P3": {
    "sentence": ("No rush.", "No rush at all, thanks.", "Whenever you can is fine.",
                 "Please look into it when you get a chance.", "No hurry, take your time.",
                 "Reply whenever you can.", "Whenever you get a chance, thanks."),
    "lead": ("No rush on this one: ", "Low priority, whenever you can: "),
    "suffix": (", no rush", " - no hurry", ", whenever you can", " - reply when you get a chance",
               ", but no rush at all"),
  },
  "P2": {  # no cue at all; an optional neutral closing sentence so P2 is not just "shorter"
    "sentence": ("Can you help?", "Please advise.", "Could you look into it?", "Thanks in advance.",
                 "Please let me know what to do.", "Can someone check?", "What are my options?"),
    "lead": (),
    "suffix": (),
  },
}
FORM_WEIGHTS = {"sentence": 3, "suffix": 2, "lead": 1, "none": 3}  # "none" only for P2 (no cue, no closing line)
URGENT_CUES = ("urgent", "asap", "immediately", "today", "as soon as possible")
RELAXED_CUES = ("no rush", "whenever", "when you get a chance", "no hurry", "take your time", "low priority")


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _check_vocabulary() -> None:
  """Invariants the task relies on: clean disjoint name pools, cue-free problem clauses, no name is a template word."""
  for pool in (FIRST_NAMES, LAST_NAMES):
    assert len(pool) == len(set(pool)), "duplicate name"
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in pool), "names must be one capitalised ASCII word"
  assert not set(FIRST_NAMES) & set(LAST_NAMES), "first and last name pools overlap"
  neutral = [p for ps in PROBLEMS.values() for p in ps] + list(URGENCY["P2"]["sentence"])
  neutral += list(INTROS + INTROS_WITH_ORDER + JOINS + SIGNOFFS + GREETINGS + ORDER_INLINE + ORDER_SENTENCES)
  for text in neutral:
    low = text.lower()
    assert not any(c in low for c in URGENT_CUES + RELAXED_CUES), f"stray urgency cue in {text!r}"
  for prio, cues in (("P1", URGENT_CUES), ("P3", RELAXED_CUES)):
    for text in (t for form in URGENCY[prio].values() for t in form):
      assert any(c in text.lower() for c in cues), f"{prio} phrase without a cue: {text!r}"
  every = " ".join(neutral + [t for u in URGENCY.values() for form in u.values() for t in form])
  words = set(re.findall(r"[a-z]+", every.lower()))
  clash = {n for n in FIRST_NAMES + LAST_NAMES if n.lower() in words}
  assert not clash, f"names that are also template words: {sorted(clash)}"


def _name_pools(seed: int) -> dict[str, tuple[list[str], list[str]]]:
  """Per split (first names, last names): train gets 85% of each pool, validation and test half the rest each."""
  rng = Random(f"ticket-routing/{seed}/names")
  pools = {}
  for which, names in (("first", FIRST_NAMES), ("last", LAST_NAMES)):
    names = sorted(names)
    rng.shuffle(names)
    held = round(len(names) * HOLDOUT_FRACTION)
    half = held // 2
    pools[which] = {"validation": names[:half], "test": names[half:held], "train": names[held:]}
  return {split: (pools["first"][split], pools["last"][split]) for split in SPLITS}


def _message(rng: Random, cat: str, prio: str, first: str, last: str, order: int) -> str:
  name = f"{first} {last}"
  ord_ref = rng.choice(ORDER_FORMATS).format(n=order)
  prob = rng.choice(PROBLEMS[cat])
  has_ord = "{ord}" in prob
  prob = prob.replace("{ord}", ord_ref)

  style = rng.choices(("intro", "intro_order", "join", "signoff"), weights=(3, 1, 1, 4))[0]
  if style == "intro_order" and has_ord:
    style = "intro"
  sentences: list[str] = []
  signoff = ""
  greeting = ""
  order_sentence = ""
  if style == "intro":
    sentences.append(rng.choice(INTROS).format(name=name))
  elif style == "intro_order":
    sentences.append(rng.choice(INTROS_WITH_ORDER).format(name=name, ord=ord_ref))
  elif style == "signoff":
    signoff = rng.choice(SIGNOFFS).format(name=name)
    greeting = rng.choice(GREETINGS)

  # The main sentence: the problem clause, with the order attached if it is not already mentioned.
  clause = prob
  if not has_ord and style != "intro_order":
    if rng.random() < 0.6:
      inline = ORDER_INLINE[:2] if style == "join" else ORDER_INLINE  # "My name is X and re #1: ..." reads badly
      clause = rng.choice(inline).format(prob=prob, ord=ord_ref)
    else:
      order_sentence = rng.choice(ORDER_SENTENCES).format(ord=ord_ref)

  # Urgency: pick a form that keeps the message within MAX_SENTENCES sentences.
  cues = URGENCY[prio]
  n_fixed = len(sentences) + 1 + bool(order_sentence)
  forms = {f: w for f, w in FORM_WEIGHTS.items()
           if (cues.get(f) or (f == "none" and prio == "P2")) and (f != "sentence" or n_fixed < MAX_SENTENCES)}
  form = rng.choices(list(forms), weights=list(forms.values()))[0]
  if form == "suffix":
    clause += rng.choice(cues["suffix"])
  if style == "join":
    main = rng.choice(JOINS).format(name=name, prob=clause)
  else:
    main = greeting + clause if greeting else _cap(clause)
    main = _cap(main) + "."
  sentences.append(main)
  if order_sentence:
    sentences.append(order_sentence)
  if form == "sentence":
    sentences.append(rng.choice(cues["sentence"]))
  text = " ".join(sentences)
  if form == "lead":
    text = rng.choice(cues["lead"]) + text
  if signoff:
    text += " " + signoff
  assert len(text.split()) < MAX_WORDS, text
  return text


def generate(seed: int = 0) -> dict[str, list[dict[str, str]]]:
  """All splits as lists of {"instruction", "input", "output"} dicts, fully determined by ``seed``."""
  _check_vocabulary()
  pools = _name_pools(seed)
  orders = Random(f"ticket-routing/{seed}/orders").sample(range(10000, 100000), sum(SPLITS.values()))
  combos = [(c, p) for c in CATEGORIES for p in PRIORITIES]
  out: dict[str, list[dict[str, str]]] = {}
  seen: set[str] = set()
  start = 0
  for split, n in SPLITS.items():
    rng = Random(f"ticket-routing/{seed}/{split}")
    labels = combos * (n // len(combos)) + rng.sample(combos, n % len(combos))  # balanced categories/priorities
    rng.shuffle(labels)
    firsts, lasts = pools[split]
    rows = []
    for (cat, prio), order in zip(labels, orders[start:start + n]):
      first, last = rng.choice(firsts), rng.choice(lasts)
      text = _message(rng, cat, prio, first, last, order)
      assert text not in seen, text  # order numbers are unique, so this never fires
      seen.add(text)
      output = f"{cat}-{prio} #{order} {last}, {first}"
      assert OUTPUT_RE.fullmatch(output), output
      rows.append({"instruction": INSTRUCTION, "input": text, "output": output})
    out[split] = rows
    start += n
  return out


def render(splits: dict[str, list[dict[str, str]]]) -> dict[str, str]:
  """File name -> exact file contents (one compact JSON object per line, '\\n' line endings)."""
  return {f"{split}.jsonl": "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)
          for split, rows in splits.items()}


def write_atomic(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file 0600; give it the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def differing_files(out: Path, files: dict[str, str]) -> list[str]:
  """Names of the files in ``files`` that are missing from ``out`` or differ from it byte for byte."""
  bad = []
  for name, text in files.items():
    path = out / name
    if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
      bad.append(name)
  return bad


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "ticket_routing")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--check", action="store_true", help="verify the files on disk instead of writing them")
  args = parser.parse_args(argv)
  files = render(generate(args.seed))
  if args.check:
    bad = differing_files(args.out, files)
    if bad:
      print(f"{args.out}: out of date or missing: {', '.join(bad)} "
            f"(regenerate with: python scripts/make_ticket_data.py --seed {args.seed})", file=sys.stderr)
      return 1
    print(f"{args.out}: up to date ({', '.join(files)})")
    return 0
  for name, text in files.items():
    write_atomic(args.out / name, text)
  counts = ", ".join(f"{name}: {text.count(chr(10))}" for name, text in files.items())
  print(f"wrote {args.out} ({counts})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
