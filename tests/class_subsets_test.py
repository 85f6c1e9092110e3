"""ImageNet-A/-R: the 200-class subsets, by WordNet ID in TFDS label order."""



from mrl_jax.evaluation import class_subsets


# --- class subsets ----------------------------------------------------------------------------

def test_imagenet_a_and_r_masks_select_their_200_classes():
  wnids = class_subsets.imagenet_wnids()
  assert len(wnids) == 1000 and wnids[0] == "n01440764"  # tench
  a = class_subsets.class_indices("imagenet_a")
  r = class_subsets.class_indices("imagenet_r")
  assert len(a) == len(set(a)) == 200 and len(r) == len(set(r)) == 200
  # ImageNet-A: stingray (6), goldfinch (11), junco (13) in; tench (0), goldfish (1) out.
  assert {6, 11, 13} <= set(a) and not {0, 1} & set(a)
  # ImageNet-R: goldfish (1), great white shark (2), hammerhead (4) in; tench (0) out.
  assert {1, 2, 4} <= set(r) and 0 not in set(r)
  mask = class_subsets.class_mask("imagenet_r", 1000)
  assert mask.sum() == 200 and mask[1] and not mask[0]
  assert class_subsets.class_mask("imagenet_v2", 1000) is None  # all 1000 classes


