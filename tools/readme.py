"""Write README.md from nbs/index.ipynb (what `nbdev-readme` does, without Quarto).

Markdown cells are copied; code cells flagged `#| hide` are dropped; other code cells are shown with their text
output. Relative image links are rewritten to point into nbs/. `--check` exits 1 if README.md is out of date.
"""
import re, sys, nbformat
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render(nb_path=ROOT/'nbs'/'index.ipynb'):
    "The README text for the notebook at `nb_path`."
    nb = nbformat.read(str(nb_path), as_version=4)
    parts = []
    for i, c in enumerate(nb.cells):
        src = c.source.strip()
        if c.cell_type == 'markdown':
            if i == 0:  # '# Title\n> summary' -> title and a quoted summary, as nbdev does
                src = re.sub(r'^> ?(.*)$', r'> \1', src, flags=re.M)
            src = re.sub(r'\]\((?!https?://|#|/)([^)]+)\)', r'](nbs/\1)', src)
            parts.append(src)
        elif c.cell_type == 'code' and not re.search(r'^#\|\s*(hide|exporti?)\b', src, re.M):
            parts.append('```python\n' + src + '\n```')
            for o in c.get('outputs', []):
                txt = o.get('text') or o.get('data', {}).get('text/plain')
                if txt: parts.append('    ' + '\n    '.join(''.join(txt).rstrip().split('\n')))
    return '<!-- WARNING: generated from nbs/index.ipynb by tools/readme.py; edit the notebook, not this file -->\n\n' + '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    txt, out = render(), ROOT/'README.md'
    if '--check' in sys.argv:
        if not out.exists() or out.read_text() != txt: sys.exit('README.md is out of date: run python tools/readme.py')
    else: out.write_text(txt)
