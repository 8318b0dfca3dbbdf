import pytest
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from llava_uhd.peers import LLAVA_NEXT_GRID_PINPOINTS, llava15_cost, llava_next_cost, select_best_resolution


def hf_llava_next_tokens(width, height):
    """Count with transformers' own LlavaNextProcessor code (unbound, on a stand-in object)."""

    class Stub:
        patch_size = 14
        num_additional_image_tokens = 0

        class image_processor:
            image_grid_pinpoints = [list(p) for p in LLAVA_NEXT_GRID_PINPOINTS]

        _get_unpadded_features = LlavaNextProcessor._get_unpadded_features

    return LlavaNextProcessor._get_number_of_features(Stub(), height, width, 336, 336)


def test_paper_numbers():
    assert llava15_cost(672, 1008).visual_tokens == 576
    assert llava_next_cost(672, 1008).visual_tokens == 2160


@pytest.mark.parametrize("wh", [(672, 1008), (1008, 672), (336, 336), (100, 2000), (2000, 100), (1280, 720),
                                (641, 479), (5000, 5000), (1, 1), (337, 1000)])
def test_llava_next_matches_transformers(wh):
    w, h = wh
    assert select_best_resolution(w, h) == tuple(hf_select_best_resolution((h, w), LLAVA_NEXT_GRID_PINPOINTS))
    assert llava_next_cost(w, h).visual_tokens == hf_llava_next_tokens(w, h)
