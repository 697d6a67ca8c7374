"""Three tiny domain collections on the fake embedder, declared as routing experts: the
fixture data of the routing tests and the service's routing endpoints."""

from __future__ import annotations

DOMAIN_DOCS = {
    "cooking": [
        ("c1", "Knead the bread dough and let the yeast rise before baking in the oven."),
        ("c2", "Simmer the tomato sauce with garlic, basil and olive oil for the pasta."),
        ("c3", "Whisk eggs with sugar and flour to bake a sponge cake in the oven."),
    ],
    "astronomy": [
        ("a1", "The telescope observed a distant galaxy and its spiral arms of stars."),
        ("a2", "Planets orbit the star; the comet crossed the orbit of the outer planet."),
        ("a3", "A supernova is the explosion of a massive star at the end of its life."),
    ],
    "football": [
        ("f1", "The striker scored a goal after the midfielder passed the ball forward."),
        ("f2", "The goalkeeper saved the penalty kick and the referee blew the whistle."),
        ("f3", "The coach changed the team formation for the second half of the match."),
    ],
}

LABELLED = [
    ("bake bread in the oven with yeast", "cooking"),
    ("pasta sauce with garlic and basil", "cooking"),
    ("sugar eggs flour cake", "cooking"),
    ("oven baking dough", "cooking"),
    ("galaxy seen through a telescope", "astronomy"),
    ("comet orbit around the star", "astronomy"),
    ("supernova explosion of a star", "astronomy"),
    ("planets and stars in the galaxy", "astronomy"),
    ("striker scored a goal", "football"),
    ("goalkeeper saved the penalty", "football"),
    ("coach team formation match", "football"),
    ("referee whistle ball kick", "football"),
]
