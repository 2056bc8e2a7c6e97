"""Caption metrics of the COCO caption evaluation (``pycocoevalcap``): METEOR 1.5 and COCO BLEU.

``pycocoevalcap`` ships the METEOR 1.5 jar with its paraphrase tables and WordNet synonyms, and
the Stanford PTB tokenizer jar, so both run offline; they need a Java runtime (``java`` on the
``PATH``). nltk's METEOR would need the WordNet corpus, which nltk downloads at run time and no
package ships, so it is not used. :func:`unavailable` says why the metrics cannot run here (or
``None`` when they can).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence


def unavailable() -> str | None:
    """Why METEOR / COCO BLEU cannot run in this environment, or ``None`` when they can."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install -e '.[llm]')"
    if shutil.which("java") is None:
        return "no Java runtime on the PATH (METEOR 1.5 and the PTB tokenizer are Java programs)"
    return None


def _require() -> None:
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"METEOR / COCO BLEU unavailable: {reason}")


def _coco(texts: Sequence[str]) -> dict[int, list[str]]:
    """Texts keyed by position, one each: the form the scorers read."""
    return {i: [text] for i, text in enumerate(texts)}


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The texts as the COCO evaluation tokenizes them (Stanford PTB tokenizer, lower case,
    punctuation tokens removed), one space-joined string each."""
    _require()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokens = PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in enumerate(texts)})
    return [tokens[i][0] for i in range(len(texts))]


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus METEOR 1.5 (English, normalised; the jar's aggregate over all segments) of the
    predictions against one reference each. Texts are passed as they are (tokenize first)."""
    _require()
    if len(predictions) != len(references):
        raise ValueError(f"meteor: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("meteor: no texts to score")
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(_coco(references), _coco(predictions))
    finally:  # stop the Java process and close all three pipes (the wrapper closes only stdin)
        process = scorer.meteor_p
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
    return float(score)


def coco_bleu(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Corpus BLEU-1..4 of the COCO evaluation (pycocoevalcap ``Bleu(4)``, ``closest`` reference
    length) on already tokenized texts."""
    _require()
    from pycocoevalcap.bleu.bleu import Bleu

    scores, _ = Bleu(4).compute_score(_coco(references), _coco(predictions), verbose=0)
    return [float(s) for s in scores]
