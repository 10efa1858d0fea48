"""Turn the user's SOURCE arguments into local files to ingest."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from schemas.records import Source

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".opus", ".ogg", ".oga", ".webm", ".mp4", ".mkv",
                  ".mov", ".wma", ".aif", ".aiff", ".mka"}


def expand_local(sources: list[str]) -> list[Source]:
    """Files as given; folders walked for audio/video files; globs expanded. Sorted, without duplicates."""
    found: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES]
        elif p.exists():
            found.append(str(p))
        else:
            found += [f for f in sorted(glob.glob(src, recursive=True)) if os.path.isfile(f)]
    return [Source(uri=Path(f).resolve().as_uri(), path=f) for f in dict.fromkeys(found)]
