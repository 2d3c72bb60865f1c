"""A folder of the user's own JPEG/PNG images, turned once into an array_record dataset.

Layout:

    folder/cat/001.jpg, folder/cat/sub/002.png, folder/dog/003.jpg  -> labelled
        (each top-level sub-folder is a class, classes sorted by name; images nested
        deeper belong to their top-level folder)
    folder/001.jpg, folder/002.png                                  -> unlabelled (label 0)

Mixing images at the top level with class folders is an error (ambiguous labels).
Hidden files and folders (".name") are ignored, as are files that are not .jpg/.jpeg/.png.

The build runs a tensorflow-datasets ``GeneratorBasedBuilder`` that yields encoded
bytes, so it needs no TensorFlow. Every file is fully decoded once at build time:
corrupt or truncated files are skipped, counted, logged with their paths and listed in
``skipped_files.txt`` beside the dataset. RGB JPEG/PNG bytes are stored as they are;
grayscale, RGBA/LA/P (composited onto white), CMYK, 16-bit and EXIF-rotated images are
converted to RGB and stored as PNG (lossless).

The dataset goes to ``<data_dir>/lapflow_image_folder/<folder name>_<fingerprint>/1.0.0``
where the fingerprint hashes the folder's absolute path and every file's relative path,
size and mtime: editing the folder makes a new build instead of silently reusing a stale
one. Later runs reuse the build and read it with ``tfds.data_source``.

Multi-host: build once before training (``python -m lapflow_jax.data.image_folder
--folder=... --data_dir=...``) into a shared data_dir, or let each host build into its
own local data_dir; hosts building into one shared directory at once would race.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

from absl import logging
from etils import epath
from PIL import Image, ImageFile, ImageOps

from lapflow_jax import cli
from lapflow_jax.data import sources

BUILDER_NAME = "lapflow_image_folder"
BUILDER_VERSION = "1.0.0"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SKIPPED_FILENAME = "skipped_files.txt"


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The image files of a folder and their labels.

    Attributes:
      folder: absolute path of the folder.
      files: paths relative to ``folder``, sorted.
      labels: class index per file (0 for every file when unlabelled).
      classes: class names (top-level sub-folders) sorted by name; empty if unlabelled.
      fingerprint: hex digest of the folder path and each file's path, size, mtime.
    """

    folder: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    fingerprint: str

    @property
    def config_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", Path(self.folder).name.lower()).strip("_") or "images"
        return f"{slug[:40]}_{self.fingerprint[:12]}"


@dataclasses.dataclass(frozen=True)
class ImageFolderDataset:
    """A built image-folder dataset.

    Attributes:
      tfds_name: "lapflow_image_folder/<config>:1.0.0", for ``tfds.data_source``.
      data_dir: the tfds data_dir it lives in.
      path: the version folder holding the array_record files.
      num_examples: images stored (readable ones).
      classes: class names (empty when unlabelled).
      skipped: (relative path, reason) of each file skipped as unreadable.
    """

    tfds_name: str
    data_dir: str
    path: str
    num_examples: int
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_image_folder(folder: str | os.PathLike) -> FolderListing:
    """Lists the JPEG/PNG files under ``folder`` with their labels (no image is read).

    Raises FileNotFoundError if ``folder`` does not exist, ValueError if it holds no
    JPEG/PNG file or mixes top-level images with class folders.
    """
    if not str(folder):
        raise ValueError("config data.folder is empty: set it to a folder of JPEG/PNG images")
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} (config data.folder) does not exist "
                                f"or is not a directory")
    files: list[str] = []
    stats: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if _is_hidden(name) or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            files.append(rel)
            st = path.stat()
            stats.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    if not files:
        raise ValueError(f"image folder {root} contains no JPEG/PNG files "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)}, case-insensitive)")
    order = sorted(range(len(files)), key=lambda i: files[i])
    files = [files[i] for i in order]
    stats = [stats[i] for i in order]
    top_level = [f for f in files if "/" not in f]
    class_names = sorted({f.split("/", 1)[0] for f in files if "/" in f})
    if class_names and top_level:
        raise ValueError(
            f"image folder {root} mixes images at its top level ({len(top_level)}, e.g. "
            f"{top_level[0]!r}) with class folders ({class_names[:5]}): move the top-level "
            f"images into a class folder, or all images out of the sub-folders"
        )
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index[f.split("/", 1)[0]] if class_names else 0 for f in files]
    digest = hashlib.sha1(str(root).encode())
    for s in stats:
        digest.update(s.encode())
        digest.update(b"\n")
    return FolderListing(str(root), tuple(files), tuple(labels), tuple(class_names),
                         digest.hexdigest())


def read_as_rgb_bytes(path: str | os.PathLike) -> bytes:
    """Returns a JPEG/PNG file's bytes, re-encoded as RGB PNG when it is not plain RGB.

    The image is decoded fully, so truncated or corrupt files raise (OSError,
    ValueError, SyntaxError or PIL's DecompressionBombError).
    """
    raw = Path(path).read_bytes()
    # Another library may have set LOAD_TRUNCATED_IMAGES globally; a build must not
    # silently keep grey-filled half images.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            fmt = img.format
            orientation = img.getexif().get(0x0112, 1)
            if fmt in ("JPEG", "PNG") and img.mode == "RGB" and orientation in (0, 1):
                return raw
            fixed = sources.pil_to_rgb(ImageOps.exif_transpose(img))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    out = io.BytesIO()
    fixed.save(out, format="PNG")
    return out.getvalue()


def _make_builder(listing: FolderListing, data_dir: str):
    """Returns a tfds GeneratorBasedBuilder for ``listing`` writing into ``data_dir``."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    # skip_registration: the class is rebuilt per folder; reading goes through tfds's
    # read-only builder from the files on disk, so no registry entry is needed.
    class LapflowImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Images of one folder, labels from its top-level sub-folders."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version(BUILDER_VERSION)
        # tfds looks for a checksums file beside the builder's code, and for a class in
        # an installed package that lookup imports `importlib_resources`, which tfds
        # does not install. Nothing is downloaded here, so there is no code path to
        # look in (tfds's own answer for builders defined in a notebook).
        code_path = None

        def __init__(self, **kwargs):
            self.skipped: list[tuple[str, str]] = []
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Images of {listing.folder}",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(
                        names=list(listing.classes) or ["unlabelled"]),
                    "path": tfds.features.Text(),
                }),
                supervised_keys=None,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            self.skipped = []
            count = 0
            for rel, label in zip(listing.files, listing.labels):
                try:
                    data = read_as_rgb_bytes(Path(listing.folder) / rel)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line per file
                    self.skipped.append((rel, reason))
                    continue
                count += 1
                yield rel, {"image": data, "label": label, "path": rel}
            if count == 0:
                raise ValueError(
                    f"image folder {listing.folder}: none of its {len(listing.files)} "
                    f"JPEG/PNG files could be decoded (e.g. {self.skipped[0][0]}: "
                    f"{self.skipped[0][1]})"
                )

    config = tfds.core.BuilderConfig(name=listing.config_name, description=listing.folder)
    return LapflowImageFolder(config=config, data_dir=data_dir,
                              file_format="array_record")


def build_image_folder(folder: str | os.PathLike, data_dir: str = "") -> ImageFolderDataset:
    """Builds (once) the array_record dataset of ``folder`` under ``data_dir``.

    Args:
      folder: the image folder (see the module docstring for the layout).
      data_dir: tfds data_dir for the build ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).

    Returns:
      ImageFolderDataset describing the build (reused when already built).
    """
    listing = list_image_folder(folder)
    data_dir = os.fspath(data_dir or sources.default_tfds_data_dir())
    if "://" not in data_dir:  # local: made absolute; a gs:// data_dir is kept as it is
        data_dir = str(Path(data_dir).expanduser().resolve())
    version_dir = epath.Path(data_dir) / BUILDER_NAME / listing.config_name / BUILDER_VERSION
    skipped_file = version_dir / SKIPPED_FILENAME
    info_file = version_dir / "dataset_info.json"
    if not info_file.is_file():
        if "://" in data_dir:
            # array_record's writer opens local files only; its reader (training) reads gs://.
            raise ValueError(
                f"image folder {listing.folder} is not built under data_dir {data_dir}, and builds "
                f"cannot be written to a remote data_dir. Build it into a local data_dir "
                f"(python -m lapflow_jax.data.image_folder --folder={listing.folder} "
                f"--data_dir=/tmp/tfds), copy that folder to {data_dir} (gcloud storage cp -r "
                f"/tmp/tfds/{BUILDER_NAME} {data_dir}/), then train with config data.name='tfds', "
                f"data.tfds_name='{BUILDER_NAME}/{listing.config_name}:{BUILDER_VERSION}' and "
                f"data.data_dir={data_dir}.")
        builder = _make_builder(listing, data_dir)
        logging.info("Building image folder %s (%d files) into %s", listing.folder,
                     len(listing.files), version_dir)
        builder.download_and_prepare()
        lines = [f"{rel}\t{reason}" for rel, reason in builder.skipped]
        skipped_file.write_text("".join(line + "\n" for line in lines))
        if builder.skipped:
            logging.warning(
                "Image folder %s: skipped %d unreadable file(s) of %d:\n  %s",
                listing.folder, len(builder.skipped), len(listing.files),
                "\n  ".join(lines),
            )
    skipped: list[tuple[str, str]] = []
    if skipped_file.is_file():
        for line in skipped_file.read_text().splitlines():
            rel, _, reason = line.partition("\t")
            skipped.append((rel, reason))
    splits = json.loads(info_file.read_text()).get("splits", [])
    num_examples = sum(int(n) for sp in splits if sp.get("name") == "train"
                       for n in sp.get("shardLengths", []))
    return ImageFolderDataset(
        tfds_name=f"{BUILDER_NAME}/{listing.config_name}:{BUILDER_VERSION}",
        data_dir=data_dir,
        path=str(version_dir),
        num_examples=num_examples,
        classes=listing.classes,
        skipped=tuple(skipped),
    )


def image_folder_source(folder: str | os.PathLike, *, data_dir: str = "", split: str = "train"):
    """Builds ``folder`` if needed and returns its tfds data source.

    Records: {"image": PNG/JPEG bytes (RGB), "label": int, "path": bytes}. ``split`` is
    "train" (the whole folder) or a tfds slice of it such as "train[:90%]".
    """
    built = build_image_folder(folder, data_dir)
    return sources.tfds_source(built.tfds_name, data_dir=built.data_dir, split=split)


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="folder of JPEG/PNG images")
    parser.add_argument("--data_dir", default="", help="tfds data_dir to build into")
    parser.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = parser.parse_args(argv)
    cli.setup_console(args.verbose)
    return cli.one_line_errors(_build, verbose=lambda: args.verbose)(args)


def _build(args: argparse.Namespace) -> None:
    folder, data_dir = cli.resolve_path(args.folder), cli.resolve_path(args.data_dir)
    built = build_image_folder(folder, data_dir)
    print(f"{built.num_examples} images, {len(built.classes)} classes, "
          f"{len(built.skipped)} skipped -> {built.path}")
    print(f"config: data.name=image_folder data.folder={folder} "
          f"data.data_dir={built.data_dir}")


if __name__ == "__main__":
    sys.exit(main())
