"""Write synthetic BBU rack scenes as LabelMe data (+ desc_map.json, the zh->en table).

  python scripts/make_synthetic_dataset.py --output_dir RAW --num_images 300 --seed 0 [--scale 2]
"""
import argparse

from bbu_jax.data.synthetic import write_labelme_dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_images", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--scale", type=int, default=1,
                   help="enlarge each scene by this factor (photos larger than max_pixels, resized at conversion)")
    args = p.parse_args(argv)
    stems = write_labelme_dataset(args.output_dir, args.num_images, args.seed, scale=args.scale)
    print(f"wrote {len(stems)} images to {args.output_dir}")


if __name__ == "__main__":
    main()
