"""Build hook: generate the gRPC stubs from protos/ (never hand-edited, never committed).

`-I protos` makes protos/distspec/v1/x.proto the module distspec.v1.x_pb2, written into
src/ so that editable and regular installs both see it.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src"


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    for proto in files:
        package = OUT / Path(proto).parent
        (package / "__init__.py").touch()


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        if self.packages is not None and "distspec.v1" not in self.packages:
            self.packages.append("distspec.v1")  # created just now, after package discovery
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
