"""Build the offline documentation site: nbs/**/*.ipynb -> _site/ with Sphinx, MyST-NB and the Furo theme.

`nbdev-docs` (Quarto, configured by nbs/_quarto.yml) builds the standard site where Quarto is installed. This script
is the thin layer that feeds the same notebooks to Sphinx (configured by docs/conf.py) where it is not:

1. every notebook goes through nbdev's own processors (`nbdev.process.NBProcessor`: `#|` directive comments
   stripped from the code, `#| hide` cells and `#| hide_line` lines dropped, housekeeping magics, ANSI codes and
   dashed headings removed) into a staging folder, under nbdev's page name (`06_data.supervoxels.ipynb` ->
   `data.supervoxels`), links between notebooks rewritten to those names;
2. the cells nbdev documents become autodoc directives: every public function/class of an `#| export(s)` cell and
   every `show_doc(x)` cell (signature, docstring, parameter comments, [source] link); the other directives
   (`echo: false`, `output: false`, `include: false`, `code-fold`, `fig-alt`/`fig-cap`) become MyST-NB cell tags
   and image options; stored outputs are rendered, notebooks are never executed; pipe tables a cell printed become
   markdown outputs (rendered as HTML tables, see `tables_to_markdown`); a function added to a class with fastcore's
   `@patch` is documented as that class's method; a class's entry lists its public methods and properties;
3. the home page (nbs/index.ipynb) gets the navigation, in the order and sections of nbs/sidebar.yml (entries whose
   notebook is missing are skipped, notebooks not listed are appended under "More");
4. Sphinx builds the HTML (warnings are errors) into a temporary folder that then replaces `--out`.

Usage: python tools/build_docs.py [--out _site] [--nbs nbs] [-q]. Exits 1 with a message naming the notebook when
one cannot be read, or with Sphinx's warnings when the site does not build cleanly.
"""
from __future__ import annotations
import argparse, ast, json, os, re, shutil, sys, tempfile, time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT/'docs'
LIB = 'fsmis'

class BuildError(Exception):
    "A notebook or the site configuration cannot be rendered."

# ---- pages and navigation -----------------------------------------------------------------------------------------

def docname(rel: Path) -> str:
    "nbdev's page name for notebook `rel` (relative to nbs/), without .html: `06_data.supervoxels.ipynb` -> `data.supervoxels`."
    from nbdev.frontmatter import nbpath2html
    return nbpath2html(Path(rel)).with_suffix('').as_posix()

def find_notebooks(nbs: Path) -> list[Path]:
    "All notebooks under `nbs` (relative), skipping names starting with `_` or `.` as nbdev does."
    return [p.relative_to(nbs) for p in sorted(nbs.rglob('*.ipynb'))
            if not any(part[0] in '._' for part in p.relative_to(nbs).parts)]

def sidebar_entries(contents, section=None, out=None) -> list[tuple[str | None, str]]:
    "Flatten Quarto sidebar `contents` into (section, notebook path) pairs."
    out = [] if out is None else out
    for e in [contents] if isinstance(contents, (str, dict)) else contents or []:
        if isinstance(e, str): out.append((section, e))
        elif 'contents' in e or 'section' in e:
            sec = e.get('section', section)
            sidebar_entries(e.get('contents', []), sec.get('text', section) if isinstance(sec, dict) else sec, out)
        elif 'href' in e or 'file' in e: out.append((section, e.get('href') or e['file']))
    return out

def site_pages(nbs: Path) -> list[tuple[Path, str, str | None]]:
    "(notebook, page name, section) in navigation order: index, then nbs/sidebar.yml's order, then unlisted notebooks."
    nbs = Path(nbs)
    existing = find_notebooks(nbs)
    if Path('index.ipynb') not in existing: raise BuildError(f'{nbs/"index.ipynb"}: the home page notebook is missing')
    order = []
    if (nbs/'sidebar.yml').exists():
        try: cfg = yaml.safe_load((nbs/'sidebar.yml').read_text()) or {}
        except yaml.YAMLError as e: raise BuildError(f'{nbs/"sidebar.yml"}: not valid YAML: {e}') from e
        sb = (cfg.get('website') or {}).get('sidebar') or {}
        if isinstance(sb, list): sb = sb[0] if sb else {}
        if isinstance(sb, dict) and sb.get('contents') != 'auto': order = sidebar_entries(sb.get('contents', []))
    seen, pages = set(), []
    for sec, p in [(None, 'index.ipynb'), *order, *[('More', r.as_posix()) for r in existing]]:
        rel = Path(os.path.normpath(p))
        if rel in seen or rel not in existing: continue
        seen.add(rel); pages.append((rel, docname(rel), sec))
    names = {}
    for rel, name, _ in pages:
        if name in names: raise BuildError(f'{nbs/rel} and {nbs/names[name]} would both become {name}.html')
        names[name] = rel
    return pages

# ---- notebook -> staged notebook ----------------------------------------------------------------------------------

def _patched_class(fn) -> str | None:
    "The class a fastcore `@patch` (or `@patch_to(Cls)`) function is added to, else None."
    for dec in fn.decorator_list:
        call = dec if isinstance(dec, ast.Call) else None
        name = ast.unparse(call.func if call else dec).split('.')[-1]
        if name == 'patch':
            args = fn.args.posonlyargs + fn.args.args
            ann = args[0].annotation if args else None
            if isinstance(ann, ast.Tuple) and ann.elts: ann = ann.elts[0]   # `self:(A, B)`: documented on the first
            if isinstance(ann, ast.BinOp): ann = ann.left                     # `self:A|B`
            if ann is not None: return ast.unparse(ann).strip('\'"')
        if name == 'patch_to' and call and call.args:
            cls = call.args[0]
            if isinstance(cls, ast.Tuple) and cls.elts: cls = cls.elts[0]
            return ast.unparse(cls)
    return None

def public_defs(src: str) -> list[str]:
    """Public functions and classes defined at the top level of a cell: the names nbdev's `add_show_docs` documents.
    A function added to a class with fastcore's `@patch` is the method `Class.name` (the module-level name that
    `@patch` leaves behind is None, so documenting it as a function would show `name = None`)."""
    try: tree = ast.parse(src)
    except SyntaxError: return []
    res = []
    for n in tree.body:
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith('_'): continue
        cls = _patched_class(n) if not isinstance(n, ast.ClassDef) else None
        res.append(f'{cls}.{n.name}' if cls else n.name)
    return res

def _autodoc(qualname: str, obj_kind: str, exclude=()) -> str:
    "An autodoc directive; classes list their public methods and properties (those documented elsewhere excluded)."
    opts = ''
    if obj_kind == 'class':
        opts = '\n   :members:\n   :undoc-members:' + (f'\n   :exclude-members: {", ".join(sorted(exclude))}' if exclude else '')
    return f'```{{eval-rst}}\n.. auto{obj_kind}:: {qualname}{opts}\n```'

def _kind(qualname: str) -> str:
    "autodoc directive for the object at `qualname` (imported)."
    import importlib, inspect
    mod, _, rest = qualname.partition(':')
    obj = importlib.import_module(mod)
    for p in rest.split('.'): obj = getattr(obj, p)
    if inspect.isclass(obj): return 'class'
    if '.' in rest:
        owner = importlib.import_module(mod)
        for p in rest.split('.')[:-1]: owner = getattr(owner, p)
        if isinstance(inspect.getattr_static(owner, rest.split('.')[-1], None), property): return 'property'
        return 'method' if callable(obj) else 'attribute'
    return 'function' if callable(obj) else 'data'

_re_fence = re.compile(r'(^```.*?^```[ \t]*$|^~~~.*?^~~~[ \t]*$)', re.M | re.S)
_re_code = re.compile(r'(?<![`\w])`([A-Za-z_][\w.]*)(\(\))?`(?!`)')
_re_link = re.compile(r'(\]\()([^)\s]+)(\))')

class Stager:
    "Writes the processed notebooks of `nbs` into `src`, ready for MyST-NB."
    def __init__(self, nbs: Path, src: Path, pages):
        self.nbs, self.src, self.pages = nbs, src, pages
        self.names = {rel: name for rel, name, _ in pages}
        self.symbols = self._symbols()
        self.patched = self._patched()

    def _patched(self) -> dict:
        "{class name: method names added by `@patch` in an exported cell of any page}: the class's entry leaves them out."
        res = {}
        for rel, _, _ in self.pages:
            try: cells = json.loads((self.nbs/rel).read_text(encoding='utf-8')).get('cells', [])
            except (OSError, ValueError): continue   # stage() reports the unreadable notebook
            for c in cells:
                src = ''.join(c.get('source', []))
                if c.get('cell_type') != 'code' or 'patch' not in src or not re.search(r'^\s*#\s*\|\s*exports?\b', src, re.M): continue
                for q in public_defs(src):
                    if '.' in q: res.setdefault(q.split('.')[-2], set()).add(q.split('.')[-1])
        return res

    def _symbols(self) -> dict:
        "Short and qualified names of the package's symbols -> qualified name (from nbdev's index, fsmis/_modidx.py)."
        self.modules = set()
        try: from fsmis._modidx import d
        except ImportError: return {}
        res, short = {}, {}
        self.modules = set(d.get('syms', {}))
        for mod, syms in d.get('syms', {}).items():
            res[mod] = mod
            for q in syms:
                res[q] = q
                short.setdefault(q.removeprefix(mod + '.'), []).append(q)
        res.update({k: v[0] for k, v in short.items() if len(v) == 1 and k not in res})
        return res

    def role(self, name: str, shown: str) -> str | None:
        "MyST cross-reference role to the package symbol `name`, shown as `shown`; None if `name` is not one."
        q = self.symbols.get(name)
        if q is None: return None
        return f'{{{"py:mod" if q in self.modules else "py:obj"}}}`{shown} <{q}>`'

    def markdown(self, text: str, rel: Path) -> str:
        "Links to notebooks -> their pages; `symbol` -> cross-reference; Quarto callouts -> MyST admonitions."
        def fix_link(m):
            href = m.group(2)
            if re.match(r'^[a-zA-Z][\w+.-]*:|^#|^/', href): return m.group(0)
            path, hash_, frag = href.partition('#')
            target = Path(os.path.normpath(rel.parent/path))
            if target.suffix == '.ipynb' and target in self.names:
                new = os.path.relpath(self.names[target] + '.ipynb', rel.parent.as_posix() if rel.parent != Path('.') else '.')
                return m.group(1) + new.replace(os.sep, '/') + hash_ + frag + m.group(3)
            return m.group(0)
        def code(m):
            return self.role(m.group(1), m.group(1) + (m.group(2) or '')) or m.group(0)
        parts = _re_fence.split(text)
        for i in range(0, len(parts), 2):
            t = _re_link.sub(fix_link, parts[i])
            t = _re_code.sub(code, t)
            t = re.sub(r'^(:::+)[ \t]*\{\.callout-(\w+)[^}]*\}[ \t]*$', r'\1{\2}', t, flags=re.M)
            parts[i] = t
        return ''.join(parts)

    def stage(self, rel: Path, name: str):
        from nbdev.process import NBProcessor
        from nbdev.processors import (strip_ansi, hide_line, filter_stream_, rm_header_dash, clean_magics, hide_,
                                      strip_hidden_metadata)
        from fastcore.nbio import read_nb, write_nb
        try: nb = read_nb(self.nbs/rel)
        except Exception as e: raise BuildError(f'{self.nbs/rel}: cannot read the notebook: {type(e).__name__}: {e}') from e
        proc = NBProcessor(nb=nb, procs=[strip_ansi, hide_line, filter_stream_, rm_header_dash, clean_magics, hide_,
                                         strip_hidden_metadata], rm_directives=True)
        try: proc.process()
        except Exception as e: raise BuildError(f'{self.nbs/rel}: nbdev cannot process it: {type(e).__name__}: {e}') from e
        default_exp = next((c.directives_['default_exp'].split()[0] for c in nb.cells
                            if c.cell_type == 'code' and c.directives_.get('default_exp')), None)
        cells, last_md, titled = [], '', False
        for c in nb.cells:
            d = c.directives_ if c.cell_type == 'code' else {}
            if c.cell_type == 'markdown':
                src = c.source
                if not titled:   # '# Title\n> summary' -> heading and a lead paragraph (markdown, so `code` renders)
                    m = re.match(r'^\s*#\s+(.+?)\s*\n(?:\s*\n)*((?:>.*(?:\n|$))+)?', src)
                    if m:
                        summary = re.sub(r'^> ?', '', m.group(2) or '', flags=re.M).strip()
                        src = f'# {m.group(1)}\n\n' + (f'{{.lead}}\n{summary}\n\n' if summary else '') + src[m.end():]
                    titled = True
                c.source = self.markdown(src, rel)
                last_md = src
                cells.append(c); continue
            if c.cell_type != 'code': cells.append(c); continue
            if c.get('outputs'): c.outputs = tables_to_markdown(c.outputs)
            if 'default_exp' in d:   # the page is the module's home: `fsmis.x` references in other pages link here
                cells.append(_md_cell(f'```{{eval-rst}}\n.. py:module:: {_modname(d["default_exp"].split()[0])}\n```')); continue
            if 'exporti' in d or _false(d.get('include')): continue
            exp = next((k for k in ('export', 'exports') if k in d), None)
            outs = [o for o in c.get('outputs', []) if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
            if exp:
                mod = (d[exp].split() or [default_exp])[0]
                names = public_defs(c.source)
                if names and mod is None:
                    raise BuildError(f'{self.nbs/rel}: a cell exports {names} but the notebook has no `#| default_exp`')
                docs = []
                for n in names:
                    q = f'{_modname(mod)}:{n}'
                    try: docs.append(_autodoc(q.replace(':', '.'), _kind(q), self.patched.get(n, ())))
                    except (ImportError, AttributeError) as e:
                        raise BuildError(f'{self.nbs/rel}: `{n}` is exported but cannot be found in module {_modname(mod)} '
                                         f'({type(e).__name__}: {e}); run nbdev-export') from None
                if docs: cells.append(_md_cell('\n\n'.join(docs)))
                if exp == 'exports' or outs:
                    c.outputs = outs
                    c.metadata['tags'] = ['hide-input'] if exp == 'exports' else ['remove-input']
                    cells.append(c)
                continue
            targets = _showdoc_targets(c.source)
            if targets:
                try:
                    cells.append(_md_cell('\n\n'.join(_autodoc(q, self._kind_of(q), self.patched.get(q.split('.')[-1], ()))
                                                        for q in self._resolve(targets, default_exp))))
                    continue
                except (KeyError, ImportError, AttributeError):
                    d.setdefault('echo', 'false')   # a symbol we cannot resolve: show the stored output
            tags = set(c.metadata.get('tags', []))
            if _false(d.get('echo')): tags.add('remove-input')
            if _false(d.get('output')): tags.add('remove-output')
            if d.get('code-fold') not in (None, '', 'false'): tags.add('hide-input')
            if not c.source.strip(): tags.add('remove-input')
            if not c.source.strip() and not c.get('outputs'): continue
            if tags: c.metadata['tags'] = sorted(tags)
            if any('image/png' in o.get('data', {}) or 'image/jpeg' in o.get('data', {}) or 'image/svg+xml' in o.get('data', {})
                   for o in c.get('outputs', [])):
                c.metadata.setdefault('mystnb', {}).setdefault('image', {})['alt'] = fig_alt(d, c.source, last_md)
            cells.append(c)
        nb.cells = cells
        for c in nb.cells:
            for k in [k for k in c if k.endswith('_')]: del c[k]
        if name == 'index': nb.cells.append(_md_cell(self.toctree()))
        dst = self.src/(name + '.ipynb')
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_nb(nb, dst)
        for img in re.findall(r'!\[[^\]]*\]\(([^)\s]+)', ''.join(c.source for c in nb.cells if c.cell_type == 'markdown')):
            f = self.nbs/rel.parent/img
            if not re.match(r'^[a-zA-Z][\w+.-]*:', img) and f.is_file():
                out = dst.parent/img
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)

    def _resolve(self, targets, default_exp):
        res = []
        for sym in targets:
            q = self.symbols.get(sym) or (self.symbols.get(f'{_modname(default_exp)}.{sym}') if default_exp else None)
            if q is None: raise KeyError(sym)
            res.append(q)
        return res

    def _kind_of(self, q: str) -> str:
        "autodoc kind of qualified name `q` (module path split at the longest importable prefix)."
        parts = q.split('.')
        for i in range(len(parts) - 1, 0, -1):
            try: return _kind('.'.join(parts[:i]) + ':' + '.'.join(parts[i:]))
            except ImportError: continue
        raise ImportError(q)

    def toctree(self) -> str:
        "Hidden toctrees, one per sidebar section, in sidebar order: Furo draws them as the navigation."
        groups = []
        for rel, name, sec in self.pages[1:]:
            if not groups or groups[-1][0] != sec: groups.append((sec, []))
            groups[-1][1].append(name)
        res = []
        for sec, names in groups:
            opts = ':hidden:\n' + (f':caption: {sec}\n' if sec else '')
            res.append('```{toctree}\n' + opts + '\n' + '\n'.join(names) + '\n```')
        return '\n\n'.join(res)

from fsmis.core import text_blocks as table_blocks  # one rule for what a printed table is: `print_md` and the builder agree

def tables_to_markdown(outputs: list) -> list:
    """Printed pipe tables (fsmis prints its results as markdown tables) become markdown outputs, so the page shows
    HTML tables instead of pipes in a text block; the printed text around them stays text, in order (as plain-text
    outputs, which MyST-NB does not merge with the cell's other streams the way it merges streams)."""
    from nbformat import from_dict
    res = []
    # a cell that shows markdown between its prints (`fsmis.core.print_md`): its printed text stays where it was printed
    mixed = any('text/markdown' in o.get('data', {}) for o in outputs)
    for o in outputs:
        text = o.get('text', '')
        text = ''.join(text) if isinstance(text, list) else text
        stdout = o.get('output_type') == 'stream' and o.get('name') == 'stdout'
        parts = table_blocks(text) if stdout and '|' in text else []
        if not any(t for t, _ in parts):
            if stdout and mixed: parts = [(False, text)]
            else: res.append(o); continue
        for is_table, part in parts:
            if is_table: data = {'text/markdown': part, 'text/plain': part}
            elif part.strip('\n'): data = {'text/plain': part.strip('\n')}
            else: continue
            res.append(from_dict({'output_type': 'display_data', 'metadata': {}, 'data': data}))
    return res

def _false(v) -> bool: return v is not None and str(v).strip().lower() in ('false', 'no', '0')
def _modname(mod: str) -> str: return mod if mod == LIB or mod.startswith(LIB + '.') else f'{LIB}.{mod}'

def _md_cell(src: str):
    from fastcore.nbio import mk_cell
    return mk_cell(src, 'markdown')

_re_showdoc = re.compile(r'^show_doc\(\s*([A-Za-z_][\w.]*)\s*(?:,[^)]*)?\)\s*;?\s*$')

def _showdoc_targets(src: str) -> list[str] | None:
    "The symbols of a cell made only of `show_doc(sym)` calls, else None."
    lines = [l.strip() for l in src.splitlines() if l.strip() and not l.strip().startswith('#')]
    ms = [_re_showdoc.match(l) for l in lines]
    return [m.group(1) for m in ms] if lines and all(ms) else None

def _plain(md: str) -> str:
    "Markdown -> one line of plain text."
    t = re.sub(r'!\[([^\]]*)\]\([^)]*\)', r'\1', md)
    t = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', t)
    t = re.sub(r'[`*#>|]|\{[\w:.-]+\}', '', t)
    return re.sub(r'\s+', ' ', t).strip()

def fig_alt(d: dict, code: str, last_md: str) -> str:
    "Alt text of a cell's figures: `#| fig-alt` or `#| fig-cap`, else the figure titles in the code and the text before it."
    for k in ('fig-alt', 'fig-cap'):
        if d.get(k): return d[k].strip().strip('"\'')
    titles = re.findall(r'''title\s*=\s*(['"])(.+?)\1''', code)
    calls = re.findall(r'\b((?:show|plot|draw|demo)_\w*|\w+_figure|overlay|imshow)\(', code)
    paras = [p for p in re.split(r'\n\s*\n', re.sub(r'^\s*#.*$', '', last_md or '', flags=re.M)) if p.strip()]
    sentences = re.split(r'(?<=[.:;!?])\s+', _plain(paras[-1])) if paras else []
    context = next((s for s in reversed(sentences) if len(s) > 20), sentences[-1] if sentences else '')
    what = 'Figure' + (f' drawn by {", ".join(dict.fromkeys(calls))}' if calls else '')
    if titles: what += ' (' + '; '.join(t for _, t in titles) + ')'
    return f'{what}: {context.rstrip(":")}' if context else what

# ---- the site -----------------------------------------------------------------------------------------------------

def build(out: Path | str = ROOT/'_site', nbs: Path | str = ROOT/'nbs', quiet: bool = True):
    "Build the site of the notebooks in `nbs` into `out` (replaced only when the build succeeds); returns the pages."
    t0 = time.time()
    nbs, out = Path(nbs).resolve(), Path(out).resolve()
    if not nbs.is_dir(): raise BuildError(f'notebook folder {nbs} does not exist')
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    os.environ.setdefault('MPLBACKEND', 'Agg')
    pages = site_pages(nbs)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='.' + out.name + '.', dir=out.parent))
    try:
        src, html = work/'src', work/'html'
        st = Stager(nbs, src, pages)
        for rel, name, _ in pages: st.stage(rel, name)
        cfg = dict(nbs=str(nbs), pages=[dict(notebook=r.as_posix(), page=n + '.html', section=s) for r, n, s in pages])
        (src/'_site.json').write_text(json.dumps(cfg, indent=1))
        from sphinx.application import Sphinx
        from sphinx.util.docutils import docutils_namespace, patch_docutils
        from sphinx.util.console import nocolor
        nocolor()
        import io
        status, warn = (io.StringIO() if quiet else sys.stdout), io.StringIO()
        with patch_docutils(str(CONF)), docutils_namespace():
            app = Sphinx(str(src), str(CONF), str(html), str(work/'doctrees'), 'html', status=status, warning=warn,
                         freshenv=True, warningiserror=False, keep_going=True)
            app.build()
        w = [l for l in warn.getvalue().splitlines() if l.strip()]
        if app.statuscode or w:
            raise BuildError('Sphinx reported problems (notebooks under ' + str(src) + '):\n' + '\n'.join(w[-40:]))
        (html/'pages.json').write_text(json.dumps(cfg['pages'], indent=1))
        (html/'.nojekyll').write_text('')
        for junk in ('.buildinfo', 'objects.inv'):
            if (html/junk).exists(): (html/junk).unlink()
        old = out.with_name('.' + out.name + '.old')
        if old.exists(): shutil.rmtree(old)
        if out.exists(): out.rename(old)
        html.rename(out)
        if old.exists(): shutil.rmtree(old)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet: print(f'built {len(pages)} pages into {out} in {time.time() - t0:.1f}s')
    return pages

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(ROOT/'_site'), help='output folder (replaced)')
    p.add_argument('--nbs', default=str(ROOT/'nbs'), help='notebook folder')
    p.add_argument('-q', '--quiet', action='store_true')
    a = p.parse_args(argv)
    try: build(a.out, a.nbs, quiet=a.quiet)
    except BuildError as e:
        print(f'build_docs: error: {e}', file=sys.stderr)
        return 1
    return 0

if __name__ == '__main__': sys.exit(main())
