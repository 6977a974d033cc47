"""A lexicon "encoder": sentiment scores that ship inside packages, per text, as features.

VADER (vaderSentiment: a rule-based lexicon tuned to social media, emoticons and emoji
included) gives neg / neu / pos / compound; the Emoji Sentiment Ranking (emoji-sentiment's
data, Kralj Novak et al. 2015) scores each emoji from -1 to 1. Cheap (a few thousand
texts a second) and orthogonal to what a pretrained encoder sees, they are cached like
any feature set (`msa extract --modalities text,image,lexicon`).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.resources

import numpy as np

# neg, neu, pos, compound (VADER); emoji count (log1p), mean, min and max emoji score; '!' count (log1p)
FEATURES = ("vader_neg", "vader_neu", "vader_pos", "vader_compound", "emoji_count", "emoji_mean", "emoji_min",
            "emoji_max", "exclamations")


class LexiconScorer:
    dim = len(FEATURES)

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.vader = SentimentIntensityAnalyzer()
        table = importlib.resources.files("emoji_sentiment") / "Emoji_Sentiment_Data_v1.0.csv"
        with table.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        # Score as the package defines it: (positive - negative) / occurrences of the emoji.
        self.emoji = {r["Emoji"]: (int(r["Positive"]) - int(r["Negative"])) /
                      (int(r["Negative"]) + int(r["Neutral"]) + int(r["Positive"])) for r in rows}

    @staticmethod
    def identity() -> dict:
        """What the scores depend on: the packages' versions."""
        return {name: importlib.metadata.version(name) for name in ("vaderSentiment", "emoji-sentiment")}

    def score(self, text: str) -> np.ndarray:
        """[dim] features of one text."""
        vader = self.vader.polarity_scores(text)
        emoji = [self.emoji[c] for c in text if c in self.emoji]
        emoji_stats = [np.log1p(len(emoji)), np.mean(emoji), min(emoji), max(emoji)] if emoji else [0.0] * 4
        return np.array([vader["neg"], vader["neu"], vader["pos"], vader["compound"], *emoji_stats,
                         np.log1p(text.count("!"))], dtype=np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """[N, dim] features."""
        return np.stack([self.score(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
