"""What is made of a simulated step: summaries, breakdowns, timelines (Perfetto, XProf), charts and
reports; and the other direction, reading real profiles to replay and compare against them."""
