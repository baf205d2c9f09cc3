"""Deterministic candidate-response generator for the simulated world.

:func:`render_response` writes a plausible answer about a prompt's topic whose
measured traits (:mod:`synth_agent.sim.traits`) follow the requested levels;
:func:`style_from_text` turns style guidance or a persona into such levels, so
simulated chat generation follows the style a system prompt asks for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from synth_agent.sim.traits import TRAITS, parse_preferences, word_count


@dataclass(frozen=True)
class Topic:
    name: str
    subject: str
    keywords: tuple[str, ...]
    prompts: tuple[str, ...]
    points: tuple[str, ...]
    examples: tuple[str, ...]
    code: tuple[str, ...]
    lang: str = "python"


TOPICS: tuple[Topic, ...] = (
    Topic(
        "python",
        "Python lists and dictionaries",
        ("python", "list", "dict", "dictionary", "comprehension"),
        (
            "How do I remove duplicates from a list in Python while keeping the order?",
            "What is the difference between a list and a dictionary in Python?",
        ),
        (
            "A dict keeps insertion order, so it can act as an ordered set.",
            "Lists are ordered sequences indexed by position.",
            "Dictionaries map keys to values and give fast lookups by key.",
            "Converting to a set drops duplicates but loses the original order.",
        ),
        (
            "dict.fromkeys([3, 1, 3, 2]) gives the keys 3, 1, 2 in that order.",
            "a phone book maps names to numbers, which is a natural dictionary.",
        ),
        (
            "items = [3, 1, 3, 2]\nunique = list(dict.fromkeys(items))\nprint(unique)  # [3, 1, 2]",
            "ages = {'ana': 31, 'li': 27}\nfor name, age in ages.items():\n    print(name, age)",
        ),
    ),
    Topic(
        "git",
        "Git branches and history",
        ("git", "commit", "branch", "merge", "rebase"),
        (
            "How do I undo my last git commit without losing the changes?",
            "Should I use git merge or git rebase for feature branches?",
        ),
        (
            "A soft reset moves the branch pointer back and keeps your changes staged.",
            "Rebase rewrites commits on top of another branch and gives a linear history.",
            "Merge keeps the true history and adds a merge commit.",
            "Never rewrite history that others have already pulled.",
        ),
        (
            "git reset --soft HEAD~1 undoes the last commit and keeps the files staged.",
            "rebasing a short-lived feature branch onto main before review keeps the log readable.",
        ),
        (
            "git reset --soft HEAD~1\ngit status",
            "git switch feature\ngit rebase main\ngit push --force-with-lease",
        ),
        "bash",
    ),
    Topic(
        "sql",
        "SQL queries",
        ("sql", "query", "database", "join", "postgres", "index"),
        ("How do I find duplicate rows in a SQL table?", "Why is my SQL query with a join so slow?"),
        (
            "GROUP BY with HAVING COUNT(*) > 1 finds repeated values.",
            "An index on the join columns usually removes the slow full scans.",
            "EXPLAIN shows the plan the database chose for your query.",
            "Selecting only the columns you need reduces the work done.",
        ),
        (
            "grouping customers by email and keeping groups with more than one row lists the duplicates.",
            "adding an index on orders.customer_id turned a nine second join into a few milliseconds.",
        ),
        (
            "SELECT email, COUNT(*)\nFROM customers\nGROUP BY email\nHAVING COUNT(*) > 1;",
            "CREATE INDEX idx_orders_customer ON orders (customer_id);\nEXPLAIN ANALYZE SELECT * FROM orders;",
        ),
        "sql",
    ),
    Topic(
        "javascript",
        "JavaScript async code",
        ("javascript", "js", "promise", "async", "await", "node"),
        (
            "How do async and await work in JavaScript?",
            "How can I run several fetch requests in parallel in JavaScript?",
        ),
        (
            "An async function always returns a promise.",
            "Await pauses the function until the promise settles, without blocking the event loop.",
            "Promise.all runs several promises at once and waits for all of them.",
            "Wrap awaits in try and catch to handle rejected promises.",
        ),
        (
            "await fetch(url) waits for the response before the next line runs.",
            "Promise.all over three fetch calls finishes in the time of the slowest one.",
        ),
        (
            "async function load(url) {\n  const res = await fetch(url);\n  return res.json();\n}",
            "const [a, b] = await Promise.all([fetch(u1), fetch(u2)]);",
        ),
        "javascript",
    ),
    Topic(
        "cooking_pasta",
        "cooking pasta",
        ("pasta", "spaghetti", "carbonara", "noodles"),
        (
            "How do I make a classic carbonara without scrambling the eggs?",
            "How much salt should I put in pasta water?",
        ),
        (
            "Take the pan off the heat before adding the egg mixture.",
            "Starchy pasta water loosens the sauce and makes it glossy.",
            "Salt the water generously, about ten grams per litre.",
            "Toss the pasta quickly so the eggs thicken instead of setting.",
        ),
        (
            "a splash of pasta water turns a clumpy egg mixture into a smooth sauce.",
            "for 500 grams of spaghetti, use five litres of water and about 50 grams of salt.",
        ),
        ("def salt_grams(litres: float) -> float:\n    return litres * 10\n\nprint(salt_grams(5))",),
    ),
    Topic(
        "baking",
        "baking bread",
        ("bread", "bake", "baking", "dough", "sourdough", "yeast", "cake"),
        ("Why is my homemade bread so dense?", "How do I keep a sourdough starter alive?"),
        (
            "Dense bread often comes from under-proofed dough.",
            "Knead until the dough passes the windowpane test.",
            "Feed a starter flour and water in equal weights every day.",
            "A warm spot speeds up the rise considerably.",
        ),
        (
            "letting the dough rise until it doubles, not just for a fixed hour, fixes most dense loaves.",
            "feeding 50 grams of starter with 50 grams of flour and 50 grams of water keeps it active.",
        ),
        (
            "def hydration(water_g: float, flour_g: float) -> float:\n    return 100 * water_g / flour_g\n\nprint(hydration(350, 500))",
        ),
    ),
    Topic(
        "meal_prep",
        "weekly meal prep",
        ("meal prep", "meal", "recipes", "lunch", "dinner", "vegetarian"),
        (
            "How can I meal prep healthy lunches for a week?",
            "What are easy vegetarian dinners for busy weeknights?",
        ),
        (
            "Cook a grain, a protein and two vegetables in one session.",
            "Store portions in sealed containers for up to four days.",
            "Sheet-pan dinners need little active time.",
            "Lentils and chickpeas are cheap, filling sources of protein.",
        ),
        (
            "a tray of roasted chickpeas and peppers with rice covers four lunches.",
            "a lentil curry takes thirty minutes and freezes well.",
        ),
        (
            "meals = ['curry', 'stir fry', 'chili']\nfor day, meal in zip(['Mon', 'Tue', 'Wed'], meals):\n    print(day, meal)",
        ),
    ),
    Topic(
        "travel_japan",
        "travelling in Japan",
        ("japan", "tokyo", "kyoto", "osaka"),
        (
            "What should I know before my first trip to Japan?",
            "Is the Japan Rail Pass worth it for a two-week trip?",
        ),
        (
            "Carry some cash, since smaller shops still prefer it.",
            "An IC card covers trains, buses and convenience stores.",
            "The rail pass pays off when you take several long shinkansen trips.",
            "Tipping is not customary in Japan.",
        ),
        (
            "a Tokyo to Kyoto round trip alone costs close to a seven-day pass.",
            "a Suica card lets you tap through gates instead of buying tickets.",
        ),
        ("trips = {'Tokyo-Kyoto': 14000, 'Kyoto-Hiroshima': 11000}\nprint(sum(trips.values()) * 2)",),
    ),
    Topic(
        "travel_budget",
        "budget travel in Europe",
        ("europe", "backpacking", "hostel", "budget travel", "interrail", "flights"),
        ("How can I travel around Europe on a tight budget?", "When is the cheapest time to book flights?"),
        (
            "Travel in the shoulder season for lower prices and smaller crowds.",
            "Night trains save the cost of a night of accommodation.",
            "Book flights a few weeks ahead and compare nearby airports.",
            "Hostels with kitchens cut food costs a lot.",
        ),
        (
            "a night train from Vienna to Venice replaces both a flight and a hotel night.",
            "flying midweek in October is often half the price of a Saturday in July.",
        ),
        ("budget = {'beds': 30, 'food': 20, 'transport': 15}\nprint(sum(budget.values()) * 14)",),
    ),
    Topic(
        "packing",
        "packing light",
        ("pack", "packing", "luggage", "carry-on", "suitcase"),
        ("How do I pack for a ten-day trip with only a carry-on?",),
        (
            "Pack for one week and plan to do laundry once.",
            "Choose clothes in colours that all combine.",
            "Wear your bulkiest shoes and jacket on travel day.",
            "Packing cubes keep a small bag organised.",
        ),
        (
            "three tops, two bottoms and one layer give over a dozen outfits.",
            "rolling t-shirts saves space compared with folding them.",
        ),
        ("items = {'tops': 3, 'bottoms': 2, 'shoes': 2}\nprint(sum(items.values()))",),
    ),
    Topic(
        "sleep",
        "better sleep",
        ("sleep", "insomnia", "tired", "nap", "bedtime"),
        ("How can I fall asleep faster at night?", "Is it bad to take naps during the day?"),
        (
            "Keep the same wake-up time every day, weekends included.",
            "Dim screens and bright lights in the hour before bed.",
            "Short naps under thirty minutes rarely hurt night sleep.",
            "A dark, quiet room helps you fall asleep.",
        ),
        (
            "getting up at 7 every day for two weeks makes falling asleep at 11 much easier.",
            "a twenty minute nap after lunch restores alertness without grogginess.",
        ),
        ("bed, wake = 23.0, 7.0\nprint((wake - bed) % 24, 'hours')",),
    ),
    Topic(
        "exercise",
        "starting to exercise",
        ("exercise", "workout", "running", "gym", "strength", "fitness"),
        ("How should a beginner start strength training?", "How do I start running without getting injured?"),
        (
            "Start with compound lifts such as squats, rows and presses.",
            "Increase the load gradually, by about five percent a week.",
            "Rest days are when muscles recover and grow.",
            "Alternate walking and running intervals in the first weeks.",
        ),
        (
            "three full-body sessions a week with squats, push-ups and rows are enough to progress.",
            "running one minute and walking two, eight times, is a gentle first session.",
        ),
        (
            "weights = [40]\nfor week in range(4):\n    weights.append(round(weights[-1] * 1.05, 1))\nprint(weights)",
        ),
    ),
    Topic(
        "nutrition",
        "healthy eating",
        ("nutrition", "diet", "protein", "calories", "vitamin", "eating"),
        ("How much protein do I need each day?", "What is a simple way to eat more vegetables?"),
        (
            "Most adults need about 0.8 grams of protein per kilogram of body weight.",
            "Active people benefit from more, up to about 1.6 grams per kilogram.",
            "Filling half the plate with vegetables is an easy rule.",
            "Frozen vegetables are as nutritious as fresh ones.",
        ),
        (
            "a 70 kilogram adult needs roughly 56 grams of protein a day.",
            "adding a handful of spinach to an omelette adds a serving of vegetables.",
        ),
        (
            "def protein_g(weight_kg: float, factor: float = 0.8) -> float:\n    return weight_kg * factor\n\nprint(protein_g(70))",
        ),
    ),
    Topic(
        "stress",
        "managing stress",
        ("stress", "anxiety", "burnout", "overwhelmed", "meditation"),
        ("What are practical ways to manage stress at work?",),
        (
            "Write down open tasks so they stop circling in your head.",
            "Short breaks every ninety minutes keep focus steady.",
            "Slow breathing with a long exhale calms the nervous system.",
            "Talking to someone you trust lightens the load.",
        ),
        (
            "breathing in for four counts and out for six, five times, lowers the heart rate.",
            "a ten minute walk at lunch breaks the afternoon slump.",
        ),
        ("import time\nfor _ in range(5):\n    print('in'); time.sleep(4)\n    print('out'); time.sleep(6)",),
    ),
    Topic(
        "budgeting",
        "personal budgeting",
        ("budget", "budgeting", "save", "saving", "money", "expenses", "debt"),
        (
            "How do I make a monthly budget that I will actually stick to?",
            "Should I pay off debt or save first?",
        ),
        (
            "The 50/30/20 rule splits income into needs, wants and savings.",
            "Automate savings on payday so the money never reaches your spending account.",
            "Pay high-interest debt first, after a small emergency fund.",
            "Track spending for one month before setting limits.",
        ),
        (
            "on a 3000 income, 50/30/20 gives 1500 for needs, 900 for wants and 600 for savings.",
            "clearing a card at 22 percent interest beats almost any savings rate.",
        ),
        (
            "income = 3000\nfor name, share in [('needs', .5), ('wants', .3), ('savings', .2)]:\n    print(name, income * share)",
        ),
    ),
    Topic(
        "investing",
        "investing for beginners",
        ("invest", "investing", "stocks", "etf", "index fund", "retirement"),
        ("How should a beginner start investing?", "What is an index fund and why do people recommend it?"),
        (
            "An index fund buys every stock in an index, so one purchase is diversified.",
            "Low fees matter because they compound over decades.",
            "Invest regularly rather than trying to time the market.",
            "Keep an emergency fund before you invest.",
        ),
        (
            "200 a month at a 6 percent return grows to about 92000 in twenty years.",
            "a global index fund spreads your money over thousands of companies.",
        ),
        (
            "balance = 0.0\nfor month in range(240):\n    balance = balance * (1 + 0.06 / 12) + 200\nprint(round(balance))",
        ),
    ),
    Topic(
        "taxes",
        "filing taxes",
        ("tax", "taxes", "deduction", "refund", "freelance"),
        ("What should a freelancer keep track of for taxes?",),
        (
            "Keep every invoice and receipt in one place.",
            "Set aside a fixed share of each payment for taxes.",
            "Business expenses such as software and equipment reduce taxable income.",
            "Quarterly estimated payments avoid a large bill and penalties.",
        ),
        (
            "setting aside 30 percent of each invoice leaves enough for the tax bill.",
            "a laptop used only for work counts as a business expense.",
        ),
        ("invoices = [1200, 800, 1500]\nprint('set aside', sum(invoices) * 0.3)",),
    ),
    Topic(
        "cover_letter",
        "writing a cover letter",
        ("cover letter", "resume", "cv", "job application", "interview"),
        ("How do I write a cover letter that stands out?", "How should I prepare for a job interview?"),
        (
            "Open with the specific role and why it interests you.",
            "Show one or two results with numbers rather than listing duties.",
            "Mirror the key words of the job description.",
            "Keep it to one page and end with a clear next step.",
        ),
        (
            "'I cut support response times by 40 percent' beats 'I handled support tickets'.",
            "preparing three stories about past projects covers most behavioural questions.",
        ),
        (
            "keywords = {'python', 'sql', 'leadership'}\nletter = open('letter.txt').read().lower()\nprint(keywords - set(letter.split()))",
        ),
    ),
    Topic(
        "essay",
        "writing an essay",
        ("essay", "thesis", "paragraph", "writing", "argument"),
        ("How do I structure a persuasive essay?", "How can I make my writing more concise?"),
        (
            "State a clear thesis in the introduction.",
            "Give each body paragraph one claim and its evidence.",
            "Address the strongest counterargument directly.",
            "Cut filler words and prefer active verbs.",
        ),
        (
            "'The results were analysed by the team' becomes 'The team analysed the results'.",
            "a three-paragraph body with claim, evidence and rebuttal fits most short essays.",
        ),
        (
            "text = 'very really quite just'\nfiller = {'very', 'really', 'quite', 'just'}\nprint([w for w in text.split() if w not in filler])",
        ),
    ),
    Topic(
        "email",
        "writing professional emails",
        ("email", "message", "colleague", "manager", "follow up"),
        ("How do I write a polite follow-up email when someone has not replied?",),
        (
            "Keep the subject line specific.",
            "Restate the request in one sentence.",
            "Offer an easy way to answer, such as a yes or no.",
            "Wait about a week before following up.",
        ),
        (
            "'Could you confirm by Friday whether the draft works?' is easy to answer.",
            "a subject like 'Budget approval needed by Friday' gets opened sooner.",
        ),
        ("from datetime import date, timedelta\nprint('follow up on', date.today() + timedelta(days=7))",),
    ),
    Topic(
        "physics",
        "physics",
        ("physics", "gravity", "quantum", "relativity", "energy", "light"),
        ("Why is the sky blue?", "How does gravity work according to general relativity?"),
        (
            "Sunlight scatters off air molecules, and blue light scatters the most.",
            "Shorter wavelengths scatter much more strongly than longer ones.",
            "General relativity describes gravity as the curvature of spacetime by mass.",
            "Objects in free fall follow the straightest paths in curved spacetime.",
        ),
        (
            "at sunset light crosses more air, the blue is scattered away and the sky turns red.",
            "GPS clocks run faster in orbit and are corrected for relativity every day.",
        ),
        ("blue, red = 450e-9, 700e-9\nprint('blue scatters', round((red / blue) ** 4, 1), 'times more')",),
    ),
    Topic(
        "biology",
        "biology",
        ("biology", "cell", "dna", "evolution", "photosynthesis", "gene"),
        ("How does photosynthesis work?", "What does DNA actually do in a cell?"),
        (
            "Plants capture light energy with chlorophyll.",
            "Water and carbon dioxide become glucose and oxygen.",
            "DNA stores the instructions for building proteins.",
            "Genes are transcribed into RNA and translated into proteins.",
        ),
        (
            "a leaf in sunlight releases the oxygen split from water molecules.",
            "the insulin gene tells cells how to build the insulin protein.",
        ),
        ("codon_table = {'AUG': 'Met', 'UUU': 'Phe'}\nprint([codon_table[c] for c in ['AUG', 'UUU']])",),
    ),
    Topic(
        "chemistry",
        "chemistry",
        ("chemistry", "acid", "molecule", "reaction", "ph"),
        ("What makes an acid strong or weak?",),
        (
            "A strong acid gives up nearly all its protons in water.",
            "A weak acid only partly dissociates.",
            "The pH scale is logarithmic.",
            "Each pH unit is a tenfold change in concentration.",
        ),
        (
            "hydrochloric acid dissociates fully, while acetic acid in vinegar mostly stays intact.",
            "a pH of 3 is ten times more acidic than a pH of 4.",
        ),
        ("import math\nprint('pH', -math.log10(1e-3))",),
    ),
    Topic(
        "space",
        "astronomy",
        ("space", "planet", "star", "black hole", "moon", "mars", "astronomy"),
        ("How do black holes form?", "Could humans live on Mars?"),
        (
            "A massive star collapses when its core runs out of fuel.",
            "If the remaining core is heavy enough, nothing stops the collapse.",
            "Mars has a thin atmosphere and no global magnetic field.",
            "Settlers would need shielding, pressurised habitats and local water ice.",
        ),
        (
            "a star over about twenty times the mass of the Sun can end as a black hole.",
            "Mars surface radiation is roughly forty times the dose on Earth.",
        ),
        ("G, c, m = 6.674e-11, 3e8, 1.989e31\nprint('radius m', 2 * G * m / c ** 2)",),
    ),
    Topic(
        "history",
        "history",
        ("history", "war", "empire", "roman", "revolution", "ancient"),
        ("Why did the Roman Empire fall?", "What caused the French Revolution?"),
        (
            "The Western Empire faced economic strain, political instability and invasions.",
            "The Eastern Empire survived for another thousand years.",
            "France was deep in debt and its tax system burdened the poor.",
            "Enlightenment ideas questioned the authority of the monarchy.",
        ),
        (
            "the empire had over twenty emperors in the fifty years of the third-century crisis.",
            "bread prices in 1789 took most of a worker's wage.",
        ),
        (
            "events = {476: 'fall of the West', 1453: 'fall of Constantinople'}\nfor year in sorted(events):\n    print(year, events[year])",
        ),
    ),
    Topic(
        "language_learning",
        "learning a language",
        ("language", "spanish", "french", "vocabulary", "grammar", "fluent"),
        (
            "What is the fastest way to learn Spanish?",
            "How many words do I need to know to be conversational?",
        ),
        (
            "Daily practice beats long weekly sessions.",
            "Spaced repetition keeps vocabulary in long-term memory.",
            "Speaking with natives early builds confidence and listening skills.",
            "About a thousand common words cover most everyday conversation.",
        ),
        (
            "fifteen minutes of flashcards each morning adds up to a few thousand words a year.",
            "a weekly conversation exchange gives real practice for free.",
        ),
        ("cards = {'perro': 'dog', 'gato': 'cat'}\nfor es, en in cards.items():\n    print(es, '->', en)",),
    ),
    Topic(
        "productivity",
        "productivity",
        ("productivity", "focus", "procrastinate", "procrastination", "time management", "habits"),
        ("How do I stop procrastinating?", "How can I build a habit that sticks?"),
        (
            "Break the task into a first step that takes five minutes.",
            "Work in focused blocks with a timer.",
            "Tie a new habit to an existing routine.",
            "Track the habit visibly so you keep the streak going.",
        ),
        (
            "'open the document and write one heading' is easier to start than 'write the report'.",
            "doing ten push-ups right after brushing your teeth anchors the habit.",
        ),
        (
            "import time\nfor block in range(4):\n    print('focus block', block + 1)\n    time.sleep(25 * 60)",
        ),
    ),
    Topic(
        "gardening",
        "gardening",
        ("garden", "gardening", "plants", "tomato", "soil", "houseplant"),
        ("How do I grow tomatoes on a balcony?", "Why are the leaves of my houseplant turning yellow?"),
        (
            "Tomatoes need at least six hours of direct sun.",
            "Use a large pot with drainage holes.",
            "Yellow leaves usually come from overwatering.",
            "Let the top few centimetres of soil dry between waterings.",
        ),
        (
            "a twenty litre pot with a cherry tomato plant can give fruit all summer.",
            "a pothos sitting in wet soil for a week shows yellow lower leaves.",
        ),
        ("soil_moisture = 0.35\nprint('water now' if soil_moisture < 0.2 else 'wait')",),
    ),
    Topic(
        "pets",
        "caring for pets",
        ("dog", "cat", "puppy", "kitten", "pet"),
        ("How do I house-train a puppy?", "Why does my cat scratch the furniture?"),
        (
            "Take the puppy outside after meals, naps and play.",
            "Reward success right away with a treat.",
            "Scratching keeps a cat's claws healthy and marks territory.",
            "A tall, sturdy scratching post near the furniture redirects the habit.",
        ),
        (
            "going out every two hours in the first week prevents most accidents.",
            "a sisal post next to the sofa usually ends the scratching within weeks.",
        ),
        ("schedule = ['07:00', '09:00', '12:00', '15:00', '18:00', '22:00']\nprint(len(schedule), 'walks')",),
    ),
    Topic(
        "home_repair",
        "home repair",
        ("fix", "repair", "leak", "faucet", "drill", "wall", "paint"),
        ("How do I fix a dripping faucet?", "How do I patch a small hole in drywall?"),
        (
            "Turn off the water supply under the sink first.",
            "A worn washer or cartridge causes most drips.",
            "Small holes need only spackle and a putty knife.",
            "Sand the patch smooth before painting.",
        ),
        (
            "replacing a two-euro washer stops a drip that wastes thousands of litres a year.",
            "a nail hole takes one thin layer of spackle and a light sanding.",
        ),
        ("drips_per_minute = 10\nprint(drips_per_minute * 60 * 24 * 365 * 0.25 / 1000, 'litres a year')",),
    ),
    Topic(
        "cars",
        "car maintenance",
        ("car", "tire", "tyre", "oil change", "engine", "battery"),
        ("How often should I change my car's oil?",),
        (
            "Modern cars often go 10000 to 15000 kilometres between oil changes.",
            "The owner's manual gives the right interval for your engine.",
            "Check tyre pressure monthly.",
            "A weak battery shows up first on cold mornings.",
        ),
        (
            "a car driven 12000 kilometres a year needs roughly one oil change a year.",
            "tyres under-inflated by 20 percent wear faster and waste fuel.",
        ),
        ("km_per_year, interval = 12000, 15000\nprint(km_per_year / interval, 'changes a year')",),
    ),
    Topic(
        "music",
        "learning an instrument",
        ("guitar", "piano", "music", "instrument", "chords", "practice"),
        ("How should I practise guitar as an adult beginner?",),
        (
            "Short daily sessions build finger strength faster than long rare ones.",
            "Learn a few open chords and switch between them slowly.",
            "Play along with songs you like to stay motivated.",
            "Use a metronome to build steady timing.",
        ),
        (
            "G, C and D cover hundreds of popular songs.",
            "switching between two chords for one minute a day makes changes smooth within weeks.",
        ),
        ("chords = ['G', 'C', 'D', 'G']\nfor bar, chord in enumerate(chords, 1):\n    print(bar, chord)",),
    ),
    Topic(
        "photography",
        "photography",
        ("photo", "photography", "camera", "aperture", "exposure", "lens"),
        ("How do I take sharper photos with my camera?",),
        (
            "Use a shutter speed at least as fast as one over the focal length.",
            "Focus on the subject's eyes in portraits.",
            "A smaller aperture gives more depth of field.",
            "Brace yourself or use a tripod in low light.",
        ),
        (
            "with a 50 millimetre lens, 1/60 of a second or faster avoids shake.",
            "f/8 keeps a whole landscape in focus.",
        ),
        ("focal_length = 50\nprint('slowest safe shutter: 1 /', focal_length)",),
    ),
    Topic(
        "ml",
        "machine learning",
        ("machine learning", "model", "neural", "overfitting", "training", "ai", "dataset"),
        (
            "What is overfitting and how do I prevent it?",
            "How do I choose a learning rate for training a neural network?",
        ),
        (
            "Overfitting means the model memorises training data and fails on new data.",
            "A held-out validation set reveals overfitting early.",
            "Regularisation, more data and early stopping all reduce it.",
            "A learning rate range test finds a good starting value quickly.",
        ),
        (
            "a model with 99 percent training accuracy and 70 percent validation accuracy is overfitting.",
            "sweeping the learning rate from 1e-5 to 1 over one epoch shows where loss drops fastest.",
        ),
        (
            "from sklearn.model_selection import train_test_split\nX_tr, X_va, y_tr, y_va = train_test_split(X, y, test_size=0.2)",
            "for lr in [1e-4, 3e-4, 1e-3]:\n    print(lr, train(lr))",
        ),
    ),
    Topic(
        "linux",
        "the Linux command line",
        ("linux", "terminal", "bash", "shell", "command line", "ssh"),
        ("How do I find which process is using a port on Linux?", "How do I set up SSH keys?"),
        (
            "ss or lsof lists the process bound to a port.",
            "ssh-keygen creates a key pair in your home directory.",
            "ssh-copy-id installs the public key on the server.",
            "Keep the private key readable only by you.",
        ),
        (
            "ss -ltnp | grep 8080 shows the program listening on port 8080.",
            "ssh-copy-id user@host lets you log in without a password afterwards.",
        ),
        ("ss -ltnp | grep :8080\nsudo lsof -i :8080", "ssh-keygen -t ed25519\nssh-copy-id user@example.com"),
        "bash",
    ),
    Topic(
        "parenting",
        "parenting",
        ("toddler", "child", "kids", "parent", "parenting", "tantrum"),
        ("How do I handle my toddler's tantrums?",),
        (
            "Stay calm and keep your voice low.",
            "Name the feeling so the child feels understood.",
            "Offer two acceptable choices to give a sense of control.",
            "Consistent routines prevent many meltdowns.",
        ),
        (
            "'You're angry that the park is closed' often calms a child faster than reasoning.",
            "'Red cup or blue cup?' avoids a standoff at dinner.",
        ),
        ("routine = ['dinner', 'bath', 'story', 'bed']\nprint(' -> '.join(routine))",),
    ),
    Topic(
        "movies",
        "film recommendations",
        ("movie", "film", "watch", "series", "book", "novel", "recommend"),
        ("Can you recommend a good science fiction movie?", "What novel should I read next if I loved Dune?"),
        (
            "Arrival is a thoughtful film about language and time.",
            "Blade Runner 2049 pairs slow pacing with striking visuals.",
            "Hyperion shares the epic scale and politics of Dune.",
            "The Left Hand of Darkness explores culture and identity.",
        ),
        (
            "fans of Dune's politics tend to enjoy Hyperion's interlocking stories.",
            "Arrival rewards a second viewing once you know the ending.",
        ),
        (
            "picks = {'Arrival': 2016, 'Blade Runner 2049': 2017}\nfor title, year in picks.items():\n    print(f'{title} ({year})')",
        ),
    ),
    Topic(
        "negotiation",
        "negotiating a salary",
        ("salary", "raise", "negotiate", "negotiation", "offer", "promotion"),
        ("How do I negotiate a higher salary offer?", "How do I ask my manager for a raise?"),
        (
            "Research the market range for the role and location.",
            "Anchor with a specific number near the top of that range.",
            "List concrete results you delivered in the past year.",
            "Treat the conversation as problem solving, not a fight.",
        ),
        (
            "if the range is 70000 to 85000, asking for 84000 leaves room to settle high.",
            "'I led the migration that saved 120 hours a month' makes a strong case.",
        ),
        ("low, high = 70000, 85000\nprint('ask for', round(low + 0.93 * (high - low), -3))",),
    ),
)

GENERIC = Topic(
    "general",
    "your question",
    (),
    (),
    (
        "Start from the goal you want to reach.",
        "Break the problem into smaller parts.",
        "Check each part against a trusted source.",
        "Adjust the plan once you see the first results.",
    ),
    (
        "writing the goal in one sentence makes the next step obvious.",
        "a short trial run shows quickly whether the plan works.",
    ),
    (
        "steps = ['define goal', 'split', 'check', 'adjust']\nfor i, step in enumerate(steps, 1):\n    print(i, step)",
    ),
)

PROMPT_POOL: tuple[str, ...] = tuple(p for t in TOPICS for p in t.prompts)
"""User prompts the simulated votes are drawn from (one topic each)."""

_PROMPT_TOPIC: dict[str, Topic] = {p: t for t in TOPICS for p in t.prompts}

# ------------------------------------------------------------------ style vocabulary the renderer uses

_FILLER = (
    "A good first step with {s} is to be clear about what you want to achieve.",
    "Small, steady changes work better than one big overhaul.",
    "Keep notes on what you try so you can compare results later.",
    "Most people see the biggest gains from the basics done consistently.",
    "It helps to review the result after a week and adjust.",
    "Reliable sources and official documentation are worth checking for details.",
    "The details vary with your situation, so adapt the advice to your own constraints.",
    "Once the basics feel natural, the advanced options are much easier to pick up.",
    "Common mistakes with {s} come from rushing the early steps.",
    "Give each change enough time to show its effect before judging it.",
    "Simple tools are usually enough to get started with {s}.",
    "Writing down a plan makes it easier to follow through.",
)
_HEDGES = (
    "That said, it depends on your situation.",
    "This might not apply in every case.",
    "Perhaps start small and see how it goes.",
    "Results could be different for you.",
    "I think this works for most people.",
    "The right choice is probably the simpler one.",
)
_FORMAL_CONNECTORS = ("Furthermore, ", "Moreover, ", "Consequently, ", "Accordingly, ")
_CASUAL_CONNECTORS = ("Honestly, ", "Basically, ", "So yeah, ", "Oh, and ")
_QUESTIONS = (
    "Would you like me to go deeper on {s}?",
    "What have you tried so far?",
    "Is there a time or budget limit I should know about?",
    "Which part matters most to you?",
)
_EMOJI = (
    "\U0001f642",
    "\U0001f44d",
    "\u2728",
    "\U0001f680",
    "\U0001f4a1",
    "\u2705",
    "\U0001f389",
    "\U0001f60a",
)
_BULLET_EXTRA = (
    "Set a clear goal first.",
    "Keep it simple at the start.",
    "Check progress regularly.",
    "Adjust based on results.",
    "Ask for feedback early.",
    "Write down what worked.",
)
_HEAD_TITLES = ("## Overview", "## Key points", "## Code", "## Next steps")
_EXAMPLE_LEADS = ("For example, ", "For instance, ", "A quick case, e.g. ")

COUNT_SCALE: dict[str, int] = {
    "bullets": 6,
    "headings": 3,
    "code": 2,
    "examples": 3,
    "emoji": 4,
    "hedging": 4,
    "questions": 3,
}
"""How many items make a count trait reach 1.0 (mirrors :mod:`synth_agent.sim.traits`)."""


_TOPIC_KEYWORDS: tuple[tuple[Topic, tuple[tuple[int, re.Pattern[str]], ...]], ...] = tuple(
    (topic, tuple((len(k), re.compile(rf"\b{re.escape(k)}\b")) for k in topic.keywords)) for topic in TOPICS
)
"""Each topic's keywords as (length, whole-word pattern), compiled once (``topic_for`` runs per chat answer)."""


def topic_for(prompt: str) -> Topic:
    """The pool topic of ``prompt``: exact pool prompt, else best keyword match, else a generic topic."""
    if not isinstance(prompt, str):
        return GENERIC
    t = _PROMPT_TOPIC.get(prompt.strip())
    if t is not None:
        return t
    low = prompt.lower()
    best, score = GENERIC, 0
    for topic, keywords in _TOPIC_KEYWORDS:
        s = sum(n for n, rx in keywords if rx.search(low))
        if s > score:
            best, score = topic, s
    return best


def _subject(prompt: str, topic: Topic) -> str:
    return topic.subject


def _code_block(topic: Topic, i: int) -> str:
    code = topic.code[i % len(topic.code)]
    # a second, distinct block when the topic has one snippet: the same idea wrapped in a function
    if i >= len(topic.code) and topic.lang == "python":
        code = (
            "def main() -> None:\n" + "\n".join("    " + line for line in code.splitlines()) + "\n\n\nmain()"
        )
    return code


def _count(trait: str, level: float) -> int:
    return int(round(max(0.0, min(1.0, level)) * COUNT_SCALE[trait]))


def render_response(prompt: str, levels: dict[str, float], rng: np.random.Generator) -> str:
    """Write an answer to ``prompt`` whose measured traits follow ``levels`` (missing traits: 0, formality 0.5)."""
    lv = {t: float(levels.get(t, 0.5 if t == "formality" else 0.0)) for t in TRAITS}
    topic = topic_for(prompt)
    s = _subject(prompt, topic)

    n_bul, n_head = _count("bullets", lv["bullets"]), _count("headings", lv["headings"])
    n_code, n_ex = _count("code", lv["code"]), _count("examples", lv["examples"])
    n_emoji, n_hedge = _count("emoji", lv["emoji"]), _count("hedging", lv["hedging"])
    n_q = _count("questions", lv["questions"])
    f = max(0.0, min(1.0, lv["formality"]))
    n_formal, n_casual = int(round(f * 4)), int(round((1 - f) * 4))
    target_words = 30 + max(0.0, min(1.0, lv["length"])) * 370

    points = list(topic.points)
    rng.shuffle(points)
    # prose: opener + two points, then filler until the target length is reached
    if n_formal > n_casual:
        opener = f"Certainly. Here is an overview of {s}."
        n_formal -= 1
    elif n_casual > n_formal:
        opener = f"Hey! Happy to help with {s}."
        n_casual -= 1
    else:
        opener = f"Here is an overview of {s}."
    prose: list[str] = [points[0], points[1 % len(points)]]
    hedges = [_HEDGES[i] for i in rng.permutation(len(_HEDGES))[:n_hedge]]
    hedges += ["This might vary."] * (n_hedge - len(hedges))
    ex_list = list(topic.examples) + list(GENERIC.examples)
    examples = [_EXAMPLE_LEADS[i % len(_EXAMPLE_LEADS)] + ex_list[i % len(ex_list)] for i in range(n_ex)]
    bullet_src = points[2:] + points[:2] + list(_BULLET_EXTRA)
    bullets = [f"- {b}" for b in bullet_src[:n_bul]]
    codes = [_code_block(topic, i) for i in range(n_code)]
    questions = [q.format(s=s) for q in _QUESTIONS[:n_q]]

    def assemble(prose_sents: list[str]) -> str:
        connect_f, connect_c = n_formal, n_casual
        sents = [opener]

        def lower_first(x: str) -> str:
            return x[0].lower() + x[1:] if len(x) > 1 and x[1].islower() else x

        for i, sent in enumerate(prose_sents + hedges):
            if connect_f > 0 and (connect_f >= connect_c or i % 2 == 0):
                sent = _FORMAL_CONNECTORS[connect_f % 4] + lower_first(sent)
                connect_f -= 1
            elif connect_c > 0:
                sent = _CASUAL_CONNECTORS[connect_c % 4] + lower_first(sent)
                connect_c -= 1
            sents.append(sent)
        while connect_f > 0:  # not enough sentences to carry all markers
            sents.append(_FORMAL_CONNECTORS[connect_f % 4] + "keep these points in mind.")
            connect_f -= 1
        while connect_c > 0:
            sents.append(_CASUAL_CONNECTORS[connect_c % 4] + "that's the gist.")
            connect_c -= 1
        heads = (
            list(_HEAD_TITLES[:n_head]) if n_head < 3 else ["## Overview", "## Key points", "## Next steps"]
        )
        blocks: list[str] = []
        h = iter(heads)
        first_head = next(h, None)
        if first_head:
            blocks.append(first_head)
        body = " ".join(sents[: max(2, len(sents) // 2)])
        blocks.append(body)
        rest = " ".join(sents[max(2, len(sents) // 2) :])
        if bullets:
            nh = next(h, None)
            if nh:
                blocks.append(nh)
            blocks.append("\n".join(bullets))
        if rest:
            blocks.append(rest)
        if examples:
            blocks.append(" ".join(e if e.endswith(".") else e + "." for e in examples))
        for c in codes:
            blocks.append(f"```{topic.lang}\n{c}\n```")
        tail: list[str] = []
        nh = next(h, None)
        if nh:
            blocks.append(nh)
            if not questions:
                tail.append("Pick one step and start today.")
        tail += questions
        if tail:
            blocks.append(" ".join(tail))
        for leftover in h:
            blocks.append(leftover)
            blocks.append("Review the plan once more.")
        return "\n\n".join(blocks)

    extra_i = 0
    fillers = [x.format(s=s) for x in _FILLER]
    order = rng.permutation(len(fillers))
    text = assemble(prose)
    pool = points[2:] + [fillers[i] for i in order]
    for _ in range(4):
        deficit = target_words - word_count(text)
        if deficit <= 0 or extra_i >= 60:
            break
        while deficit > 0 and extra_i < 60:
            sent = pool[extra_i % len(pool)]
            prose.append(sent)
            deficit -= word_count(sent)
            extra_i += 1
        text = assemble(prose)
    if n_emoji:
        text = _add_emoji(text, n_emoji, rng)
    return text


def _add_emoji(text: str, n: int, rng: np.random.Generator) -> str:
    """Append ``n`` emoji at ends of prose sentences (outside code blocks and headings)."""
    parts = re.split(r"(```.*?```)", text, flags=re.S)
    spots = [
        (pi, m.end())
        for pi, part in enumerate(parts)
        if not part.startswith("```")
        for m in re.finditer(r"[.!](?=\s|$)", part)
    ]
    chosen = sorted(rng.choice(len(spots), size=min(n, len(spots)), replace=False).tolist()) if spots else []
    emojis = [_EMOJI[int(i)] for i in rng.integers(0, len(_EMOJI), size=n)]
    inserts: dict[int, list[int]] = {}
    for k in chosen:
        pi, pos = spots[k]
        inserts.setdefault(pi, []).append(pos)
    ei = 0
    for pi, positions in inserts.items():
        part = parts[pi]
        for pos in sorted(positions, reverse=True):
            part = part[:pos] + " " + emojis[ei] + part[pos:]
            ei += 1
        parts[pi] = part
    out = "".join(parts)
    if ei < n:
        out += " " + " ".join(emojis[ei:])
    return out


def random_levels(rng: np.random.Generator) -> dict[str, float]:
    """Random trait levels: length and formality uniform; count traits off half the time, else 0.3-1."""
    out: dict[str, float] = {}
    for t in TRAITS:
        if t in ("length", "formality"):
            out[t] = float(rng.uniform(0.0, 1.0))
        else:
            out[t] = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.3, 1.0))
    return out


def generate_candidates(prompt: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct candidate answers to ``prompt`` with random trait levels."""
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < n * 10:
        tries += 1
        text = render_response(prompt, random_levels(rng), rng)
        if text not in out:
            out.append(text)
    return out


_PERSONA_BLOCK = re.compile(r"<persona>\s*(.*?)\s*</persona>", re.S | re.I)


def levels_from_weights(weights: dict[str, float]) -> dict[str, float]:
    """Target levels for signed preference weights: likes high, dislikes 0, 'somewhat' in between."""
    out: dict[str, float] = {}
    for t, w in weights.items():
        if w >= 1.5:
            out[t] = 1.0
        elif w >= 0.75:
            out[t] = 0.85
        elif w > 0:
            out[t] = 0.65
        elif w <= -0.75:
            out[t] = 0.0
        elif w < 0:
            out[t] = 0.15
    return out


def style_from_text(system_prompt: str) -> dict[str, float]:
    """Target trait levels for the style a system prompt or persona asks for.

    Reads the ``<persona>`` block when there is one (else the whole text) with the
    shared phrase vocabulary ("strongly prefers bullet lists", "dislikes emoji") and
    simple instructions ("use bullet lists", "be concise", "no emoji"). Only traits the
    text mentions are returned.
    """
    if not isinstance(system_prompt, str):
        return {}
    m = _PERSONA_BLOCK.search(system_prompt)
    text = m.group(1) if m else system_prompt
    return levels_from_weights(parse_preferences(text))
