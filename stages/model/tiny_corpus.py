"""The embedded English text the tiny model's byte-level BPE tokenizer is trained on.

Written for this project (no third-party text), so it can ship with the code.
It only has to contain enough everyday English for the learned merges to look
like a real tokenizer's: common words, punctuation, numbers, a little code.
"""

from __future__ import annotations

TINY_CORPUS = """\
Hello! Hello, world. Hi there, how are you today? I am fine, thank you, and you?
Good morning. Good evening. Good night, and see you tomorrow.

The little server woke up before dawn. It checked its queues, found them empty,
and waited for the first request of the day. When the request came, it was a
short one: a single question about the weather. The server read the words, turned
them into numbers, and began to think one token at a time.

A model is a function that maps a sequence of tokens to a guess about the next
token. It does not know what the words mean in the way that people do, but it has
seen how they usually follow one another. Given "the cat sat on the", it will
often guess "mat", because that is what the text it learned from tended to say.

There are many ways to choose the next word. The simplest is to take the most
likely one every time; this is called greedy decoding. Another is to draw at
random, with the chance of each word given by the model. A temperature makes the
choice more or less adventurous, and the top-k and top-p rules keep only the
words that matter most.

Time is the scarce resource. Every step that waits for the host is a step the
accelerator spends doing nothing at all. So the work is split into stages: one
prepares the inputs, one runs the model, one reads the results, and one writes
them out. While one step is running, the next one is already being prepared.

In the morning the market opens at nine. People buy bread, milk, apples, and
coffee. Some of them talk about the news, some about their children, and some
about the rain that did not come. The baker has been awake since four o'clock.
She says that the first loaf of the day is always the best one.

Numbers are words too: one, two, three, four, five, six, seven, eight, nine, ten.
We counted 12 boats in the harbor, 3 of them red and 9 of them white. The year
had 365 days, 52 weeks and 12 months. Prices went up by 2.5 percent.

def greet(name):
    return "Hello, " + name + "!"

for i in range(10):
    print(i, greet("world"))

What is your name? Where do you live? Why is the sky blue? When does the train
leave? Which way is the station? Who wrote this letter, and what did they want?

The river runs through the valley and down to the sea. In spring the water is
high and fast, and in summer it is low and warm. Children swim near the bridge,
and old men fish from the rocks. At night you can hear it from every house in
the village, a quiet sound that never stops.

Once upon a time there was a small robot who wanted to write a poem. It knew
many words but not which ones belonged together. So it read books all night, and
in the morning it wrote: "The sun is a warm light, and the day is long."
It was not a great poem, but it was its own, and the robot was happy.

A good program does one thing well. Its names say what they mean, its comments
say why, and its errors tell you what went wrong and how to fix it. It keeps
its memory bounded, it never trusts the data it reads, and it tests the things
that matter.

Thank you for reading. Have a nice day, and please come back soon.
"""
