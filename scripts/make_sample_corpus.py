"""Regenerate the bundled sample corpus: docstrings of the Python standard library.

The docstrings are real English technical text written by the CPython developers (PSF License),
and every Python installation has them. Output: JSONL.gz with id, text, module, kind.

    python scripts/make_sample_corpus.py src/embindex/data/sample_corpus.jsonl.gz
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import sys
import warnings

MODULES = """abc argparse array ast asyncio base64 bisect bz2 calendar cmath collections colorsys
concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis email
enum filecmp fnmatch fractions ftplib functools getopt getpass gettext glob graphlib gzip hashlib heapq
hmac html html.parser http.client http.cookies http.server imaplib importlib inspect io ipaddress
itertools json keyword linecache locale logging logging.handlers lzma mailbox math mimetypes mmap
multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pickletools pkgutil platform
plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets select selectors shelve
shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess
symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize trace
traceback tracemalloc types typing unicodedata unittest urllib.parse urllib.request uuid warnings wave
weakref xml.dom.minidom xml.etree.ElementTree xml.sax zipfile zipimport zlib zoneinfo""".split()


def docs():
    seen = set()
    for name in MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
        items = [(name, "module", mod)]
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", name) not in (name, mod.__name__):
                continue
            if inspect.isclass(obj):
                items.append((f"{name}.{attr}", "class", obj))
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and callable(fn):
                        items.append((f"{name}.{attr}.{meth}", "method", fn))
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                items.append((f"{name}.{attr}", "function", obj))
        for qualname, kind, obj in items:
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 80 or qualname in seen:
                continue
            seen.add(qualname)
            yield {"id": qualname, "text": f"{qualname}\n\n{doc}", "module": name, "kind": kind}


def main(out: str, limit: int = 3000) -> None:
    rows = list(docs())[:limit]
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(rows)} documents -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
