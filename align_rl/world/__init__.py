"""What the assimilation system is given: the embedded Held–Suarez truth, observations, backgrounds and the splits around them."""
