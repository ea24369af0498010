"""The names both sides of a FedQSN federation agree on: records and keys.

The server (the strategies) and the client (this project's ClientApp, a user's
own handlers through :mod:`fedqsn_flwr.flower.client_helpers`) import these
from here and from nowhere else, so the two cannot drift apart. How the arrays
inside the records are laid out is :mod:`fedqsn_flwr.flower.proxy`'s job.

Server to client (train and evaluate messages):

* :data:`PROXY_RECORD` (ArrayRecord) and :data:`LAYOUT_RECORD` (ConfigRecord):
  a FedQSN proxy; FedAvg sends plain arrays under the strategy's
  ``arrayrecord_key`` (Flower's ``"arrays"``) instead;
* the strategy's ``configrecord_key`` (Flower's ``"config"``): the round's
  settings, with :data:`SERVER_ROUND_KEY` added and, when the server asks for
  hidden-unit feedback, :data:`HIDDEN_FEEDBACK_KEY`; in this project's app, on a
  data set split into the server's and the clients' rows, also
  :data:`PARTITION_ROWS_KEY` (the rows this client holds: which rows are the
  server's derives from its secret, so the clients cannot compute them).

Client to server:

* train reply: :data:`UPDATE_RECORD` (FedQSN) or plain arrays (FedAvg),
  optionally :data:`FEEDBACK_RECORD`, and :data:`METRICS_RECORD` holding
  :data:`NUM_EXAMPLES_KEY` (the strategy's ``weighted_by_key``) and any other
  numbers, e.g. :data:`TRAIN_LOSS_KEY`;
* evaluate reply: :data:`METRICS_RECORD` holding :data:`NUM_EXAMPLES_KEY` and
  any other numbers (this project's clients send ``loss`` and ``accuracy``);
* query reply (this project's app only): :data:`METRICS_RECORD` holding
  :data:`PARTITION_ID_KEY` and :data:`NUM_PARTITIONS_KEY`, so that sampling
  and masks follow partitions, not the node ids Flower assigns.
"""

from __future__ import annotations

#: ArrayRecord of a proxy (visible units only, quantized).
PROXY_RECORD = "proxy"
#: ConfigRecord describing how the proxy's arrays are laid out.
LAYOUT_RECORD = "proxy-layout"
#: ArrayRecord of a client's update to a proxy (visible units only).
UPDATE_RECORD = "update"
#: ArrayRecord of a client's hidden-unit feedback (``hidden-feedback``).
FEEDBACK_RECORD = "feedback"
#: MetricRecord of every reply.
METRICS_RECORD = "metrics"

#: Number of examples behind a reply (Flower's default ``weighted_by_key``).
NUM_EXAMPLES_KEY = "num-examples"
#: Mean training loss in a train reply (optional).
TRAIN_LOSS_KEY = "train-loss"
#: Added by the strategies to every message's config.
SERVER_ROUND_KEY = "server-round"
#: In a train config: the server wants hidden-unit feedback in the reply.
HIDDEN_FEEDBACK_KEY = "hidden-feedback"
#: In a train or evaluate config: the data-set rows of the receiving client's partition.
PARTITION_ROWS_KEY = "partition-rows"
#: A query's config asks for this; the reply's metrics hold these two.
QUERY_ASK_KEY = "ask"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
