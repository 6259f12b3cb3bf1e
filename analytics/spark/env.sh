# Sourced by scripts/check-spark and scripts/bench/analytics (from the repository root): makes
# sure Java and the pinned pyspark are there, installing what is missing, and sets
#   SPARK_PY          the virtualenv's python, with pyspark
#   PYSPARK_VERSION   the pin from analytics/spark/requirements.txt
#   JAVA_MAJOR        8, 11 or 17
# Java comes from Debian (openjdk-17-jre-headless) when missing and running as root; pyspark
# goes into ${XDG_CACHE_HOME:-~/.cache}/mercato/venv-spark. Anything that cannot be installed
# stops the caller with the command to run.
_spark_env_fail() { echo "spark env: $*" >&2; exit 1; }
_spark_requirements=analytics/spark/requirements.txt
PYSPARK_VERSION="$(sed -n 's/^pyspark==//p' "$_spark_requirements")"
[ -n "$PYSPARK_VERSION" ] || _spark_env_fail "no pyspark== pin in $_spark_requirements"

if ! command -v java >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "spark env: installing Java (apt-get install -y openjdk-17-jre-headless)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; } \
            || _spark_env_fail "could not install Java: apt-get install -y openjdk-17-jre-headless"
    else
        _spark_env_fail "Java is required for Spark: sudo apt-get install -y openjdk-17-jre-headless"
    fi
fi
# Spark 3.5 runs on Java 8, 11 and 17.
JAVA_MAJOR="$(java -version 2>&1 | sed -n 's/.*version "\(1\.\)\{0,1\}\([0-9]*\).*/\2/p' | head -1)"
case "$JAVA_MAJOR" in
    8|11|17) ;;
    *) _spark_env_fail "Spark $PYSPARK_VERSION needs Java 8, 11 or 17, found '${JAVA_MAJOR:-none}': apt-get install -y openjdk-17-jre-headless, then JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64" ;;
esac

_spark_venv="${XDG_CACHE_HOME:-$HOME/.cache}/mercato/venv-spark"
if [ ! -x "$_spark_venv/bin/python" ] \
    || [ "$("$_spark_venv/bin/pip" show pyspark 2>/dev/null | sed -n 's/^Version: //p')" != "$PYSPARK_VERSION" ]; then
    echo "spark env: installing pyspark $PYSPARK_VERSION into $_spark_venv" >&2
    mkdir -p "$(dirname "$_spark_venv")"
    python3 -m venv "$_spark_venv" || _spark_env_fail "python3 -m venv failed (apt-get install -y python3-venv)"
    "$_spark_venv/bin/pip" install -q -r "$_spark_requirements" || _spark_env_fail "pip install -r $_spark_requirements failed"
fi
SPARK_PY="$_spark_venv/bin/python"
