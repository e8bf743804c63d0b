"The installed package: every module imports, and a non-editable build contains every module."
import importlib, os, pkgutil, subprocess, sys, zipfile
from pathlib import Path
import fsmis

ROOT = Path(__file__).resolve().parents[1]


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(fsmis.__path__, 'fsmis.'))


def test_every_module_imports():
    mods = _modules()
    assert 'fsmis.core' in mods
    for m in mods: importlib.import_module(m)


def test_wheel_has_every_module(tmp_path):
    "`pip install .` (non-editable) must ship every module: build the wheel and compare with the source tree."
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                   check=True, cwd=tmp_path)
    whl, = tmp_path.glob('fsmis-*.whl')
    names = set(zipfile.ZipFile(whl).namelist())
    src = {str(p.relative_to(ROOT)) for p in (ROOT/'fsmis').rglob('*.py')}
    assert src <= names, f"missing from the wheel: {sorted(src - names)}"
    weights = {'fsmis/weights/adnet_chaos_t2_small.pth', 'fsmis/weights/LICENSE', 'fsmis/weights/README.md'}
    assert weights <= names, f"the bundled model is missing from the wheel: {sorted(weights - names)}"
    assert zipfile.ZipFile(whl).getinfo('fsmis/weights/adnet_chaos_t2_small.pth').file_size <= 15e6
    # and the installed copy imports every module from outside the source tree
    target = tmp_path/'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(whl)], check=True)
    code = ("import importlib, pkgutil, fsmis; assert fsmis.__file__.startswith(%r), fsmis.__file__; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fsmis.__path__, 'fsmis.')]; "
            "from fsmis.eval.inference import bundled_model_path; assert str(bundled_model_path()).startswith(%r)") % (str(target), str(target))
    subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path, env={'PYTHONPATH': str(target), 'PATH': '/usr/bin:/bin'})


def test_readme_install_then_test_script_install_keeps_a_working_package(tmp_path):
    """The README's first command (`pip install .`, then `fsmis demo` with cold caches: empty HOME and FSMIS_CACHE, so numba
    compiles) followed by the test script's editable install, in one fresh copy: no compiled file lands in the installed
    package, and `fsmis --help` then works from another folder (the bug: numba's cache in site-packages/fsmis/ outlived the
    reinstall and shadowed the editable package)."""
    import shutil, site, sysconfig
    clone = tmp_path/'clone'
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns('.git', '.venv*', '_site', '__pycache__', '*.egg-info', 'build', 'dist'))
    env = tmp_path/'env'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env)], check=True)
    py = env/'bin'/'python'
    purelib = Path(subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (torch, fastai, ...) come from this interpreter's site-packages, appended to the path; its .pth files
    # (among them this checkout's editable fsmis) are not processed, so fsmis is only what the new environment installs
    (purelib/'deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    cold = dict(os.environ, HOME=str(tmp_path/'home'), FSMIS_CACHE=str(tmp_path/'cache'), MPLBACKEND='Agg')
    cold.pop('PYTHONPATH', None)
    pip = [str(py), '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '-q']
    subprocess.run(pip + ['.'], cwd=clone, env=cold, check=True)
    r = subprocess.run([str(py), '-m', 'fsmis.cli', 'demo', '--out', str(tmp_path/'demo'), '--steps', '2', '--n-cases', '6',
                        '--n-queries', '1', '--size', '32', '--quiet'], cwd=clone, env=cold, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    installed = purelib/'fsmis'
    assert (installed/'cli.py').is_file() and not [p for p in installed.rglob('*') if p.suffix in ('.nbi', '.nbc')]
    assert list((tmp_path/'cache'/'numba').rglob('*.nbi')), 'numba cache not in $FSMIS_CACHE/numba'
    subprocess.run(pip + ['-e', '.'], cwd=clone, env=cold, check=True)  # what tools/test.sh does next
    elsewhere = tmp_path/'elsewhere'; elsewhere.mkdir()
    r = subprocess.run([str(env/'bin'/'fsmis'), '--help'], cwd=elsewhere, env=cold, capture_output=True, text=True)
    assert r.returncode == 0 and 'demo' in r.stdout, r.stderr[-2000:]
    r = subprocess.run([str(py), '-c', 'import fsmis.data.io, fsmis; print(fsmis.__file__)'], cwd=elsewhere, env=cold, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(clone)), (r.stdout, r.stderr[-1000:])
