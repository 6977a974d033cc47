"""Text as posts are written, made readable to an encoder pretrained on prose.

`tweet`: URLs become `http`, @mentions `@user` (the placeholders of TweetEval and
BERTweet), `#HashTags` their words ("#NotJustForGirls" -> "not just for girls"), emoji
their names (the `emoji` package: "😍" -> "smiling face with heart-eyes"), letters repeated
more than twice trimmed to two ("soooo" -> "soo"), and the retweet marker `RT` dropped.
"""

from __future__ import annotations

import re

URL = re.compile(r"https?://\S+|www\.\S+")
MENTION = re.compile(r"@\w+")
HASHTAG = re.compile(r"#(\w+)")
CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
REPEATED = re.compile(r"(\w)\1{2,}")
RETWEET = re.compile(r"^RT\s+|\bRT\s+(?=@)")


def hashtag_words(tag: str) -> str:
    """`NotJustForGirls` -> `not just for girls`; `LarryIsReal2` -> `larry is real 2`."""
    words = CAMEL.findall(tag.replace("_", " "))
    return " ".join(words).lower() if words else tag.lower()


def normalise_tweet(text: str) -> str:
    import emoji

    text = RETWEET.sub("", text)
    text = URL.sub("http", text)
    text = MENTION.sub("@user", text)
    text = HASHTAG.sub(lambda m: hashtag_words(m.group(1)), text)
    text = emoji.demojize(text, delimiters=(" ", " ")).replace("_", " ")
    text = REPEATED.sub(r"\1\1", text)
    return " ".join(text.split())


def normalise(texts: list[str], how: str) -> list[str]:
    if how == "none":
        return list(texts)
    return [normalise_tweet(t) for t in texts]
