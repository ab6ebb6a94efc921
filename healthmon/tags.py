"""Tag names (placeholder until the tags module lands)."""

ALERT_TEXT_TAG = "healthmon/alerts"
CONFIG_TAG = "healthmon/config"
ALERT_RECORD_TAG = "healthmon/alert_records"
